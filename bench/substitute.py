"""Throughput of the substituted forward pass vs the unmodified eager pass of the same model on the same batches.

Usage: python bench/substitute.py [--model-dir resources/models/smollm2-135m/hf] [--library results/M/library]
                                  [--fraction 0.25] [--examples N] [--batch-size B]
With --library, the programs of the heads with the highest val IoU stand in for `fraction` of the heads, timed
two ways: "first pass", with empty caches (running the programs is part of the cost), and "reused", with each
program's matrices already computed, as in a sweep, which runs every program once per evaluation text before
its runs (attnprog.substitute.compute_matrices_once); without --library, the same share of heads gets the
uniform matrix (the cost of the mechanism alone). Prints tokens/s of each, the first-pass ratio as
`substituted_first_pass_vs_eager: <ratio>` and, last, `substituted_vs_eager: <ratio>` (the reused pass, or the
uniform matrix; substituted tokens/s over eager tokens/s; 1.0 = no slower).
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
    n_replaced = round(args.fraction * info.n_heads_total)

    def heads_to_replace() -> dict:
        """Fresh runners (empty caches) for the best heads, or the uniform matrix on the first heads."""
        if args.library is None:
            return {head: substitute.uniform_attention for head in info.heads[:n_replaced]}
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

    reused = heads_to_replace()  # computed once, then reused by every repeat (as a sweep does)
    replacer.set_heads(reused)
    run(substituted)

    def first_pass():
        replacer.set_heads(heads_to_replace())
        run(substituted)

    def reused_pass():
        replacer.set_heads(reused)
        run(substituted)

    run(eager)  # warm-up
    passes = {"eager": lambda: run(eager), "substituted": reused_pass}
    if args.library:
        passes["first pass"] = first_pass
    timings = {name: [] for name in passes}
    for _ in range(args.repeats):  # interleaved, so background load hits all alike
        for name, fn in passes.items():
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in timings.items()}
    what = f"programs from {args.library}" if args.library else "the uniform matrix"
    print(f"model: {args.model_dir} on {device}; {len(examples)} examples, {n_tokens} tokens, batch size "
          f"{args.batch_size}, best of {args.repeats}; {len(replacer.heads)} heads replaced by {what}")
    for name, seconds in best.items():
        print(f"{name}: {seconds:.2f} s, {n_tokens / seconds:.0f} tokens/s")
    if "first pass" in best:
        print(f"substituted_first_pass_vs_eager: {best['eager'] / best['first pass']:.3f}")
    print(f"substituted_vs_eager: {best['eager'] / best['substituted']:.3f}")


if __name__ == "__main__":
    main()
