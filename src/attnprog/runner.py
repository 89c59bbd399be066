"""Running programs on examples: many programs on many examples, prefix by prefix, the causality check,
and one program called again and again (model substitution).

Trusted programs (written by the project's own synthesizer) run in this process. Everything else runs in
`attnprog.sandbox`. A program that fails on an example gets `None` for that example's matrix and a status
other than "ok"; it never raises out of `run_programs`.
"""
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .programs import Program, ProgramError, call_program, describe_exception, load_programs
from .sandbox import Job, Limits, Sandbox, shared_sandbox


@dataclass
class ProgramRun:
    name: str
    status: str                    # "ok" or the first failure (a contracts.PROGRAM_STATUSES entry)
    error: str | None
    matrices: list = field(default_factory=list)  # per example: normalised float32 n x n, or None if it failed

    @property
    def n_failed(self) -> int:
        return sum(m is None for m in self.matrices)

# ---------------------------------------------------------------------------------------------------------
# Running many programs


def _as_examples(examples) -> list[tuple[list[str], str]]:
    """(tokens, text) pairs from pairs or from bare token lists (text = the tokens joined)."""
    out = []
    for item in examples:
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], str) \
                and not isinstance(item[0], str):
            tokens, text = [str(t) for t in item[0]], item[1]
        else:
            tokens = [str(t) for t in item]
            text = "".join(tokens)
        out.append((tokens, text))
    return out


def _prefix_text(tokens: list[str], text: str, k: int) -> str | None:
    """The part of `text` that tokens[:k] cover (special tokens the tokenizer adds are not in the text)."""
    joined = "".join(tokens)
    if not joined.endswith(text):
        return None
    skip = len(joined) - len(text)
    return "".join(tokens[:k])[skip:]


_trusted_functions: dict = {}
_tokenizers: dict = {}


def _trusted_function(program: Program):
    """Run a trusted program's module once in this process (cached by source) and return its function."""
    key = (program.name, hashlib.sha256(program.source.encode()).hexdigest())
    if key not in _trusted_functions:
        namespace = {"__name__": f"attnprog_program_{program.name}"}
        exec(compile(program.source, program.path or program.name, "exec"), namespace)
        _trusted_functions[key] = namespace[program.function]
    return _trusted_functions[key]


def _reference_tokenizer(tokenizer_dir):
    from .sandbox import load_reference_tokenizer
    key = str(tokenizer_dir)
    if key not in _tokenizers:
        _tokenizers[key] = load_reference_tokenizer(key)
    return _tokenizers[key]


def _run_trusted(program: Program, calls, causal, last_row, tokenizer_dir):
    """(call statuses, outputs, errors) of a trusted program run in this process."""
    try:
        fn = _trusted_function(program)
        tokenizer = _reference_tokenizer(tokenizer_dir) if program.kind == "reference" else None
    except Exception as e:
        status = "syntax_error" if isinstance(e, SyntaxError) else "runtime_error"
        message = describe_exception(e, program.path or program.name, program.source)
        return [status] * len(calls), [None] * len(calls), [message] * len(calls)
    statuses, outputs, errors = [], [], []
    with np.errstate(all="ignore"):
        for tokens, text in calls:
            status, payload = call_program(fn, program.kind, tokens, text, tokenizer, causal=causal,
                                           last_row=last_row, filename=program.path or program.name,
                                           source=program.source)
            statuses.append(status)
            outputs.append(payload if status == "ok" else None)
            errors.append(None if status == "ok" else payload)
    return statuses, outputs, errors


def _run_calls(programs: list[Program], calls_per_program: list, *, causal, last_row, tokenizer_dir, limits,
               sandbox) -> list[tuple[list, list, list]]:
    """Run each program on its own list of (tokens, text) calls: trusted ones here, the rest in the sandbox.
    Returns per program (call statuses, outputs, errors). The sandbox server checks that every matrix it
    hands over is normalised, so a sandboxed program cannot pass on anything else."""
    if tokenizer_dir is None and any(p.kind == "reference" for p in programs):
        raise ValueError("reference-signature programs need tokenizer_dir (the model's tokenizer folder)")
    results: list = [None] * len(programs)
    jobs, job_index = [], []
    for i, (program, calls) in enumerate(zip(programs, calls_per_program)):
        if program.trusted:
            results[i] = _run_trusted(program, calls, causal, last_row, tokenizer_dir)
        else:
            jobs.append(Job(program.source, program.path or program.name, program.function, program.kind,
                            list(calls), causal=causal, last_row=last_row))
            job_index.append(i)
    if jobs:
        needs_tokenizer = any(job.kind == "reference" for job in jobs)
        box = sandbox or shared_sandbox(tokenizer_dir if needs_tokenizer else None)
        for i, result in zip(job_index, box.run_many(jobs, limits)):
            results[i] = (result.call_status, result.outputs, result.call_errors)
    return results


def _load_all(programs) -> list[Program]:
    out = []
    for p in programs:
        out.extend([p] if isinstance(p, Program) else load_programs(p))
    names = [p.name for p in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"run_programs: duplicate program names {duplicates[:3]}")
    return out


def _summarise(name: str, statuses: list, matrices: list, errors: list) -> ProgramRun:
    """The run's status is its first failure; "ok" only when every example has its matrix (consumers may
    rely on that), whatever the statuses say."""
    matrices = [m if s == "ok" and isinstance(m, np.ndarray) else None for s, m in zip(statuses, matrices)]
    for status, error, matrix in zip(statuses, errors, matrices):
        if status != "ok":
            return ProgramRun(name, status, error, matrices)
        if matrix is None:
            return ProgramRun(name, "bad_output", "no matrix came back", matrices)
    return ProgramRun(name, "ok", None, matrices)


def _prefix_calls(tokens, text, kind):
    """The calls that rebuild one example row by row from prefixes (row i from tokens[:i+1])."""
    return [(tokens[:i + 1], _prefix_text(tokens, text, i + 1) if kind == "reference" else text)
            for i in range(len(tokens))]


def run_programs(programs, examples, *, tokenizer_dir=None, limits: Limits = Limits(), causal: bool = True,
                 prefixwise: bool = False, sandbox: Sandbox | None = None) -> dict[str, ProgramRun]:
    """Run every program on every example. `programs`: Program objects or paths (files or folders, loaded as
    untrusted). `examples`: (tokens, text) pairs or token lists. With `prefixwise`, row i of each matrix comes
    from the program run on tokens[:i+1] only (the safe way to run a program that fails `check_causal`).
    Returns {name: ProgramRun}; failures are reported in the run, never raised."""
    programs = _load_all(programs)
    examples = _as_examples(examples)
    if not prefixwise:
        results = _run_calls(programs, [examples] * len(programs), causal=causal, last_row=False,
                             tokenizer_dir=tokenizer_dir, limits=limits, sandbox=sandbox)
        return {p.name: _summarise(p.name, *result) for p, result in zip(programs, results)}
    calls = [[c for tokens, text in examples for c in _prefix_calls(tokens, text, p.kind)] for p in programs]
    results = _run_calls(programs, calls, causal=True, last_row=True, tokenizer_dir=tokenizer_dir,
                         limits=limits, sandbox=sandbox)
    runs = {}
    for program, (statuses, rows, errors) in zip(programs, results):
        matrices, example_status, example_error, start = [], [], [], 0
        for tokens, _ in examples:
            n = len(tokens)
            part = slice(start, start + n)
            start += n
            bad = [(s, e) for s, e in zip(statuses[part], errors[part]) if s != "ok"]
            if bad:
                matrices.append(None)
                example_status.append(bad[0][0])
                example_error.append(bad[0][1])
                continue
            matrix = np.zeros((n, n), dtype=np.float32)
            for i, row in enumerate(rows[part]):
                matrix[i, :i + 1] = row[:i + 1]
            matrices.append(matrix)
            example_status.append("ok")
            example_error.append(None)
        runs[program.name] = _summarise(program.name, example_status, matrices, example_error)
    return runs


def run_prefixwise(program: Program, examples, **kwargs) -> ProgramRun:
    """One program run prefix by prefix: row i depends only on tokens[:i+1], whatever the program does."""
    return run_programs([program], examples, prefixwise=True, **kwargs)[program.name]


# ---------------------------------------------------------------------------------------------------------
# Causality


@dataclass
class CausalCheck:
    causal: bool
    max_difference: float   # largest change of a row i when tokens after i are cut or changed
    comparisons: int        # (example, cut) pairs compared
    detail: str

    def __bool__(self) -> bool:
        return self.causal


def _cuts(n: int, per_example: int) -> list[int]:
    """Cut points k (compare rows 0..k-1) spread over 1..n-1."""
    if n < 2:
        return []
    return sorted({max(1, min(n - 1, round(n * q / (per_example + 1)))) for q in range(1, per_example + 1)}
                  | {n - 1})


def _perturbed_tail(tail: list[str]) -> list[str]:
    """Different tokens after the cut: reversed, or (when that changes nothing) a filler word."""
    reversed_tail = tail[::-1]
    return reversed_tail if reversed_tail != tail else [" x"] * len(tail)


def check_causal(program: Program, examples, *, cuts_per_example: int = 3, max_examples: int = 8,
                 atol: float = 1e-4, tokenizer_dir=None, limits: Limits = Limits(),
                 sandbox: Sandbox | None = None) -> CausalCheck:
    """Does row i depend only on tokens 0..i? For several cut points k per example, rows 0..k-1 of the full
    output (normalised) must match the output on tokens[:k] and the output with tokens k.. changed."""
    examples = _as_examples(examples)[:max_examples]
    calls, plan = [], []  # plan: (example index, k, index of the full call, indexes of comparison calls)
    for e, (tokens, text) in enumerate(examples):
        full = len(calls)
        calls.append((tokens, text))
        for k in _cuts(len(tokens), cuts_per_example):
            variants = []
            tail = _perturbed_tail(tokens[k:])
            prefix = _prefix_text(tokens, text, k) if program.kind == "reference" else text
            for variant_tokens in (tokens[:k], tokens[:k] + tail):
                if program.kind == "reference":
                    if prefix is None:
                        continue
                    variant_text = prefix + "".join(variant_tokens[k:])
                else:
                    variant_text = "".join(variant_tokens)
                variants.append(len(calls))
                calls.append((variant_tokens, variant_text))
            plan.append((e, k, full, variants))
    statuses, outputs, errors = _run_calls([program], [calls], causal=True, last_row=False,
                                           tokenizer_dir=tokenizer_dir, limits=limits, sandbox=sandbox)[0]
    worst, worst_where, compared = 0.0, "", 0
    for e, k, full, variants in plan:
        if outputs[full] is None:
            continue
        for v in variants:
            if outputs[v] is None:
                continue
            difference = float(np.abs(outputs[full][:k, :k] - outputs[v][:k, :k]).max())
            compared += 1
            if difference > worst:
                what = "cut" if len(calls[v][0]) == k else "changed"
                worst, worst_where = difference, f"example {e}: rows before {k} change when later tokens are {what}"
    if compared == 0:
        failure = next((f"{s}: {m}" for s, m in zip(statuses, errors) if s != "ok"), "no examples long enough")
        return CausalCheck(False, float("nan"), 0, f"could not be checked ({failure})")
    if worst > atol:
        return CausalCheck(False, worst, compared, f"{worst_where} (max difference {worst:.3g})")
    return CausalCheck(True, worst, compared, f"causal on {compared} comparisons")


# ---------------------------------------------------------------------------------------------------------
# One program, called again and again (model substitution)


class ProgramRunner:
    """One program as a function tokens -> normalised n x n matrix, cached by token tuple (substitution calls
    it for every batch). Trusted programs run here; others in the shared sandbox, one child per batch of
    uncached examples (`many`). A failure raises ProgramError."""

    def __init__(self, program: Program, *, causal: bool = True, prefixwise: bool = False, tokenizer_dir=None,
                 limits: Limits = Limits(), cache_size: int = 4096, sandbox: Sandbox | None = None):
        self.program, self.causal, self.prefixwise = program, causal, prefixwise
        self.tokenizer_dir, self.limits, self.sandbox = tokenizer_dir, limits, sandbox
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()

    def __call__(self, tokens, text: str | None = None) -> np.ndarray:
        return self.many([(list(tokens), text if text is not None else "".join(map(str, tokens)))])[0]

    def many(self, examples) -> list[np.ndarray]:
        examples = _as_examples(examples)
        keys = [(tuple(tokens), text) for tokens, text in examples]
        missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if missing:
            run = run_programs([self.program], [(list(t), text) for t, text in missing],
                               tokenizer_dir=self.tokenizer_dir, limits=self.limits, causal=self.causal,
                               prefixwise=self.prefixwise, sandbox=self.sandbox)[self.program.name]
            for key, matrix in zip(missing, run.matrices):
                if matrix is not None:  # keep what worked: a retry example by example reuses it
                    self._cache[key] = matrix
            if run.status != "ok":
                raise ProgramError(run.status, f"{self.program.name}: {run.error}")
        out = []
        for key in keys:
            self._cache.move_to_end(key)
            out.append(self._cache[key])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out
