"""The jail's costs: start-up, warm per-program cost, the prefix parse, and a published-style library.

Usage: python bench/sandbox.py [--workers 2] [--programs 300] [--examples 72] [--library 1500]
                               [--tokenizer resources/models/smollm2-135m/hf]
Prints:
- jail start-up: seconds until a worker is ready, without and with a tokenizer;
- ms per program per example on warm workers: small helper programs (bench/programs.py's) on examples of
  16-64 tokens, as wall clock over all workers and as worker time (wall x workers);
- the prefix parse of the linguistic helpers: ms per token of the examples (cold cache, in-process);
- a reference-style library of `--library` functions (tests/fixtures/reference_library.py) on `--examples`
  examples with the model's tokenizer: % of functions ok, wall time, failures by status and reason.
"""
import argparse
import collections
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]

from fixtures.reference_library import make_library  # noqa: E402
from programs import WORDS, make_programs  # noqa: E402

from attnprog import linguistics  # noqa: E402
from attnprog.programs import load_programs  # noqa: E402
from attnprog.runner import run_programs  # noqa: E402
from attnprog.sandbox import Limits, Sandbox  # noqa: E402

SENTENCES = [
    "Once upon a time, a little girl named Lily found a shiny red ball in the park.",
    "She wanted to show it to her mom, so she ran home as fast as she could.",
    "The big brown dog barked at the cat, and the cat climbed up the tall tree.",
    "Tom and his friend Sam built a castle out of sand near the blue sea.",
    "When the sun went down, the birds sang a happy song in the old garden.",
    "Mia was sad because her toy car was broken, but her dad fixed it.",
    "The teacher said that every child should bring a book to school tomorrow.",
    "A small mouse lived in a hole under the kitchen floor of a big house.",
    "He looked at the sky and saw a cloud that looked like a funny hat.",
    "They ate cake and cookies at the party, and then they played games together.",
]


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(SENTENCES, rng.randint(1, 3))) for _ in range(n)]


def default_tokenizer_dir() -> str:
    for candidate in (ROOT / "resources/models/smollm2-135m/hf", Path("/work/baseline/resources/models/smollm2-135m/hf")):
        if (candidate / "tokenizer.json").is_file():
            return str(candidate)
    from tinyworld import make_tokenizer
    folder = tempfile.mkdtemp(prefix="bench-tokenizer-")
    make_tokenizer(bos=True).save_pretrained(folder)
    return folder


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its reaped children, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def timed(fn):
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began


def reason(error: str | None) -> str:
    """A failure's kind: the exception name, or the message with numbers and names stripped."""
    found = re.search(r"\b([A-Z][A-Za-z]*(Error|Exception))\b", error or "")
    return found.group(1) if found else re.sub(r"[0-9]+", "N", (error or "")[:60])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--programs", type=int, default=300)
    parser.add_argument("--examples", type=int, default=72)
    parser.add_argument("--library", type=int, default=1500)
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args()
    tokenizer_dir = args.tokenizer or default_tokenizer_dir()

    # start-up
    box, seconds = timed(lambda: Sandbox(workers=1))
    box.close()
    print(f"jail start-up (one worker, no tokenizer): {1000 * seconds:.0f} ms")
    box, seconds = timed(lambda: Sandbox(tokenizer_dir, workers=1))
    box.close()
    print(f"jail start-up (one worker, with the tokenizer): {1000 * seconds:.0f} ms")

    # warm per-program cost
    rng = random.Random(0)
    examples = [[rng.choice(WORDS) for _ in range(rng.randint(16, 64))] for _ in range(args.examples)]
    programs = make_programs(args.programs)
    with Sandbox(workers=args.workers) as box:
        run_programs(programs[:args.workers], examples[:2], sandbox=box)  # warm
        runs, seconds = timed(lambda: run_programs(programs, examples, sandbox=box))
    assert all(r.status == "ok" for r in runs.values()), {r.status for r in runs.values()}
    calls = len(programs) * len(examples)
    print(f"warm workers: {len(programs)} programs x {len(examples)} examples on {args.workers} workers: "
          f"{seconds:.2f} s; {1000 * seconds / calls:.3f} ms per program per example (wall), "
          f"{1000 * seconds * args.workers / calls:.3f} ms (worker time)")

    # prefix parse
    from transformers import AutoTokenizer

    from attnprog.data import token_strings
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sentences = texts(args.examples)
    real = [(token_strings(tokenizer, tokenizer(t).input_ids), t) for t in sentences]
    linguistics.english_pipeline()
    _, seconds = timed(lambda: linguistics.prepare([tokens for tokens, _ in real]))
    n_tokens = sum(len(tokens) for tokens, _ in real)
    print(f"prefix parse: {n_tokens} tokens in {len(real)} examples: {seconds:.2f} s, "
          f"{1000 * seconds / n_tokens:.2f} ms per token")

    # the library
    folder = Path(tempfile.mkdtemp(prefix="bench-library-"))
    path = folder / "reference_library.py"
    path.write_text(make_library(args.library))
    library = load_programs(path)
    print(f"library: {path.stat().st_size / 1e6:.2f} MB, {len(library)} programs, {len(real)} examples "
          f"({n_tokens} tokens), {args.workers} workers, tokenizer {tokenizer_dir}")
    began_cpu = os.times()
    with Sandbox(tokenizer_dir, workers=args.workers) as box:
        runs, seconds = timed(lambda: run_programs(library, real, tokenizer_dir=tokenizer_dir, sandbox=box,
                                                   limits=Limits(seconds_per_call=5, memory_mb=1024)))
        jail_cpu = sum(cpu_seconds(pid) for pid in box.host_pids())
    ended_cpu = os.times()
    ok = sum(r.status == "ok" for r in runs.values())
    print(f"library: {ok}/{len(runs)} functions ok ({100 * ok / len(runs):.1f}%), wall {seconds:.1f} s "
          f"(CPU: host process {ended_cpu.user + ended_cpu.system - began_cpu.user - began_cpu.system:.1f} s, "
          f"jails {jail_cpu:.1f} s)")
    reasons = collections.Counter((r.status, reason(r.error)) for r in runs.values() if r.status != "ok")
    for (status, why), count in reasons.most_common():
        print(f"  failed: {count} x {status}: {why}")
    missing = sum(r.error is None for r in runs.values() if r.status != "ok")
    print(f"  failures without a reason: {missing}")


if __name__ == "__main__":
    main()
