"""CPU seconds per head of the offline synthesizer under each objective (iou, output), and what each buys on
val, on a few heads of a finished run.

Usage: python bench/output_fit.py --results results/smollm2-135m [--heads 8]
The run's value Grams are used when its head inputs hold them (a run with objective: output); otherwise
they are recorded here: the model (info.json's load_path) runs once over the run's examples, and the
attention that pass gives must equal the run's. Per head (spread over the layers) and objective: CPU seconds
of `synthesize_offline` (fitting and writing the candidates; rerank's scoring not included), and among its
candidates on val the best soft IoU and the lowest relative output error (0 = the head's own output, 1 = the
uniform matrix's; each chosen by its own measure). Last line: `output_fit_cpu_s_per_head: <seconds>`.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from attnprog.contracts import EXAMPLES, HeadInputs, ModelInfo  # noqa: E402
from attnprog.matrices import pack, unpack_many  # noqa: E402
from attnprog.programs import load_programs  # noqa: E402
from attnprog.runner import run_programs  # noqa: E402
from attnprog.scoring import mean_iou  # noqa: E402
from attnprog.settings import OfflineSynthesisSettings  # noqa: E402
from attnprog.synthesize import synthesize_offline  # noqa: E402
from attnprog.synthesize.fit import split_data  # noqa: E402
from attnprog.synthesize.output_fit import ValueGrams, relative_output_error  # noqa: E402


def inputs_with_grams(results: Path, folder: Path) -> HeadInputs:
    """The run's head inputs if they hold value Grams, else the same recorded again with them."""
    run = HeadInputs(results / "synthesis/head_inputs.npz")
    with np.load(run.path) as z:
        if any(key.startswith("gram_") for key in z.files):
            return run
    from attnprog import extract, models

    info = ModelInfo.read(results / "model/info.json")
    tokenizer = models.load_tokenizer(info)
    start = time.perf_counter()
    examples = results / "data/examples.parquet"
    extract.extract_attention(models.load_model(info, "cpu"), EXAMPLES.read(examples), folder / "attention",
                              8, tokenizer.pad_token_id, progress=False, grams_dir=folder / "grams")
    extract.write_head_inputs(folder / "attention", examples, folder / "head_inputs.npz", folder / "grams")
    ours = HeadInputs(folder / "head_inputs.npz")
    for head in info.heads[:: max(1, len(info.heads) // 5)]:
        gap = np.abs(ours.attention(head, "synth") - run.attention(head, "synth")).max()
        if gap > 1e-3:
            raise SystemExit(f"{head}: recorded attention differs from the run's by {gap:.2g}: another model or corpus?")
    print(f"value Grams recorded: one extraction pass with Grams, {time.perf_counter() - start:.1f} s wall")
    return ours


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="a finished run's results/{model} folder")
    parser.add_argument("--heads", type=int, default=8, help="heads, spread evenly over the model")
    args = parser.parse_args()
    results = Path(args.results)
    info = ModelInfo.read(results / "model/info.json")
    heads = info.heads[:: max(1, len(info.heads) // args.heads)][: args.heads]
    features = results / "synthesis/features.npz"
    cpu = {"iou": [], "output": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = inputs_with_grams(results, tmp)
        synth, val = inputs.examples("synth"), inputs.examples("val")
        print(f"{'head':>7s} {'objective':>9s} {'cands':>5s} {'cpu s':>6s} {'val IoU':>8s} {'val out err':>11s}")
        for head in heads:
            real = inputs.attention(head, "val")
            data = split_data(np.zeros((len(real), 1)), val.lengths, real)
            values = ValueGrams(inputs.value_grams(head, "val"), data)
            for objective in cpu:
                grams = inputs.value_grams(head, "synth") if objective == "output" else None
                folder = tmp / objective / head.name
                start = time.process_time()
                manifest = synthesize_offline(features, synth.example_ids, inputs.attention(head, "synth"), folder,
                                              info.model, head, OfflineSynthesisSettings.defaults(objective=objective), grams)
                cpu[objective].append(time.process_time() - start)
                programs = load_programs(folder, trusted=True)
                runs = run_programs(programs, val.calls())
                iou = max(mean_iou(runs[p.name].matrices, unpack_many(real, val.lengths)) for p in programs)
                error = min(relative_output_error(np.concatenate([pack(m) for m in runs[p.name].matrices]), data, values)
                            for p in programs)
                print(f"{head.name:>7s} {objective:>9s} {len(manifest.candidates):5d} {cpu[objective][-1]:6.2f} "
                      f"{iou:8.3f} {error:11.3f}", flush=True)
    for objective, seconds in cpu.items():
        print(f"{objective}: {np.mean(seconds):.2f} s CPU per head (x{info.n_heads_total} heads: "
              f"{np.mean(seconds) * info.n_heads_total / 60:.1f} min)")
    print(f"output_fit_cpu_s_per_head: {np.mean(cpu['output']):.2f}")


if __name__ == "__main__":
    main()
