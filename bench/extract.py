"""Extraction throughput vs the raw eager forward pass of the same model on the same batches.

Usage: python bench/extract.py [--model-dir resources/models/smollm2-135m/hf] [--examples N] [--batch-size B]
Prints tokens/s of both and, last, `extract_vs_forward: <ratio>` (goal >= 0.9).
"""
import argparse
import tempfile
import time

import torch

from attnprog import extract, models
from benchdata import default_examples


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="resources/models/smollm2-135m/hf")
    parser.add_argument("--examples", type=int, default=72)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    info = models.describe_model("bench", {"local_dir": args.model_dir})
    tokenizer = models.load_tokenizer(info)
    model = models.load_model(info, "auto")
    examples = default_examples(tokenizer, args.examples)
    batches = extract.batches_by_length(examples, args.batch_size)
    n_tokens = int(examples["input_ids"].map(len).sum())
    device = next(model.parameters()).device

    @torch.inference_mode()
    def forward_only():
        for batch in batches:
            ids, mask = extract.padded_batch(batch, tokenizer.pad_token_id, device)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def extraction():
        with tempfile.TemporaryDirectory() as out:
            extract.extract_attention(model, examples, out, args.batch_size, tokenizer.pad_token_id, progress=False)

    forward_only()  # warm-up
    timings = {"forward": [], "extract": []}
    for _ in range(args.repeats):  # interleaved, so background load hits both alike
        for name, fn in (("forward", forward_only), ("extract", extraction)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in timings.items()}
    print(f"model: {args.model_dir} on {device}; {len(examples)} examples, {n_tokens} tokens, "
          f"batch size {args.batch_size}, best of {args.repeats}")
    for name, seconds in best.items():
        print(f"{name}: {seconds:.2f} s, {n_tokens / seconds:.0f} tokens/s")
    print(f"extract_vs_forward: {best['forward'] / best['extract']:.3f}")


if __name__ == "__main__":
    main()
