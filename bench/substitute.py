"""Throughput of the substituted forward pass vs the unmodified eager pass of the same model on the same batches.

Usage: python bench/substitute.py [--model-dir resources/models/smollm2-135m/hf] [--library results/M/library]
                                  [--fraction 0.25] [--examples N] [--batch-size B]
With --library, the best programs of the heads with the highest val IoU stand in for `fraction` of the heads, and
their caches start empty in every repeat (program execution is part of the cost); without it, the same share
of heads gets the uniform matrix (the cost of the mechanism alone). Prints tokens/s of each and, last,
`substituted_vs_eager: <ratio>` (substituted tokens/s over eager tokens/s; 1.0 = no slower).
"""
import argparse
import time
from pathlib import Path
from functools import partial

import torch

from attnprog import data, extract, models, substitute
from benchdata import default_examples


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="resources/models/smollm2-135m/hf")
    parser.add_argument("--library", default=None, help="a results/{model}/library folder (default: uniform)")
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    info = models.describe_model("bench", {"local_dir": args.model_dir})
    tokenizer = models.load_tokenizer(info)
    eager = models.load_model(info, "auto")
    substituted = models.load_model(info, "auto")
    replacer = substitute.install(substituted, partial(data.token_strings, tokenizer))
    examples = default_examples(tokenizer, args.examples)
    batches = extract.batches_by_length(examples, args.batch_size)
    n_tokens = int(examples["input_ids"].map(len).sum())
    device = next(eager.parameters()).device
    n_replaced = round(args.fraction * info["n_layers"] * info["n_heads"])

    def heads_to_replace() -> dict:
        """Fresh runners (empty caches) for the best heads, or the uniform matrix on the first heads."""
        if args.library is None:
            heads = [(layer, head) for layer in range(info["n_layers"]) for head in range(info["n_heads"])]
            return {head: substitute.uniform_attention for head in heads[:n_replaced]}
        library = Path(args.library)
        best = substitute.read_best(library / "best.parquet")
        programs = substitute.program_replacements(library / "programs", library / "programs.parquet", best,
                                                   args.model_dir, log=lambda m: None)
        ranked = [(int(r.layer), int(r.head)) for r in best.itertuples() if (r.layer, r.head) in programs]
        return {head: programs[head] for head in ranked[:n_replaced]}

    @torch.inference_mode()
    def run(model):
        for batch in batches:
            ids, mask = extract.padded_batch(batch, tokenizer.pad_token_id, device)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def substituted_run():
        replacer.set_heads(heads_to_replace())
        run(substituted)

    run(eager)  # warm-up
    timings = {"eager": [], "substituted": []}
    for _ in range(args.repeats):  # interleaved, so background load hits both alike
        for name, fn in (("eager", lambda: run(eager)), ("substituted", substituted_run)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in timings.items()}
    what = f"programs from {args.library}" if args.library else "the uniform matrix"
    print(f"model: {args.model_dir} on {device}; {len(examples)} examples, {n_tokens} tokens, batch size "
          f"{args.batch_size}, best of {args.repeats}; {len(replacer.heads)} heads replaced by {what}")
    for name, seconds in best.items():
        print(f"{name}: {seconds:.2f} s, {n_tokens / seconds:.0f} tokens/s")
    print(f"substituted_vs_eager: {best['eager'] / best['substituted']:.3f}")


if __name__ == "__main__":
    main()
