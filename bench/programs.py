"""Program-running throughput: a library of programs on a batch of examples, sandboxed and in-process.

Usage: python bench/programs.py [--programs 300] [--examples 40] [--max-tokens 128] [--workers N]
Prints seconds for: starting the sandbox, running every program on every example in the sandbox and
in-process (trusted), the causality check of every program, a prefix-by-prefix run of one program, and
the per-call runner (first call, cached call). The programs are small helper compositions of the kind the
offline synthesizer writes; the examples are random word sequences.
"""
import argparse
import dataclasses
import random
import time

from attnprog.programs import programs_from_source
from attnprog.runner import ProgramRunner, check_causal, run_prefixwise, run_programs
from attnprog.sandbox import Sandbox

WORDS = [" the", " cat", " sat", " on", " a", " mat", ".", " She", " said", ",", " and", " then", " it",
         " ran", " away", "\n", " Tom", "'s", " dog", " 42"]
TEMPLATES = [
    "from attnprog.helpers import offset, first_token\n"
    "def attention(tokens):\n    n = len(tokens)\n    return offset(n, {k}) + 0.{w} * first_token(n)\n",
    "import numpy as np\nfrom attnprog.helpers import is_punctuation, key_is, causal_softmax, log_distance\n"
    "def attention(tokens):\n    n = len(tokens)\n"
    "    return causal_softmax({k} * key_is(is_punctuation(tokens)) - 0.{w} * log_distance(n))\n",
    "import numpy as np\n"
    "def attention(tokens):\n    n = len(tokens)\n    a = np.zeros((n, n))\n"
    "    for i in range(n):\n        a[i, max(0, i - {k})] = 1.0\n        a[i, 0] += 0.{w}\n    return a\n",
]


def make_programs(count: int):
    programs = []
    for i in range(count):
        source = f'"""Benchmark program {i}."""\n' + TEMPLATES[i % len(TEMPLATES)].format(k=i % 5, w=i % 10)
        programs += programs_from_source(source, f"bench_{i}")
    return programs


def timed(label: str, fn):
    began = time.perf_counter()
    result = fn()
    print(f"{label}: {time.perf_counter() - began:.2f} s")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=300)
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    rng = random.Random(0)
    examples = [[rng.choice(WORDS) for _ in range(rng.randint(args.max_tokens // 4, args.max_tokens))]
                for _ in range(args.examples)]
    programs = make_programs(args.programs)
    n_tokens = sum(map(len, examples))
    print(f"{len(programs)} programs x {len(examples)} examples ({n_tokens} tokens)")

    sandbox = timed("sandbox start", lambda: Sandbox(workers=args.workers))
    print(f"workers: {sandbox.workers}")
    runs = timed("run_programs, sandboxed", lambda: run_programs(programs, examples, sandbox=sandbox))
    assert all(r.status == "ok" for r in runs.values()), {r.status for r in runs.values()}
    trusted = [dataclasses.replace(p, trusted=True) for p in programs]
    timed("run_programs, trusted in-process", lambda: run_programs(trusted, examples))
    timed("check_causal, every program (sandboxed)",
          lambda: [check_causal(p, examples, sandbox=sandbox) for p in programs])
    timed("run_prefixwise, one program (sandboxed)", lambda: run_prefixwise(programs[0], examples, sandbox=sandbox))
    runner = ProgramRunner(programs[1], sandbox=sandbox)
    timed("ProgramRunner, first call", lambda: runner(examples[0]))
    timed("ProgramRunner, cached call", lambda: runner(examples[0]))
    sandbox.close()


if __name__ == "__main__":
    main()
