"""Attention programs: the file format, loading, running, and the causality check.

A program is a standalone `.py` file: a module docstring saying in plain English what the head does, and

    def attention(tokens: list[str]) -> numpy.ndarray:   # n x n, row i = where token i attends

Files written to the reference code's signature, `prog(sentence: str, tokenizer) -> (label, matrix)`, load
too: each top-level function with two positional parameters, the second named like a tokenizer
(`tokenizer`, `tok`, ...), becomes one program `<file stem>.<function>`. They are called with the example's
text and the model's tokenizer; a matrix whose size is not the example's token count is `bad_output`.

Every output goes through `normalise_attention` (causal mask, negatives and non-finite values to 0, rows
summing to 1, an all-zero row attending to position 0) before anyone scores or substitutes it.

Trusted programs (written by the project's own synthesizer) run in this process. Everything else runs in
`attnprog.sandbox`. A program that fails on an example gets `None` for that example's matrix and a status
other than "ok"; it never raises out of `run_programs`.
"""
import ast
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .sandbox import Job, Limits, ProgramError, Sandbox, shared_sandbox, validate_source

__all__ = ["Program", "ProgramError", "ProgramRun", "CausalCheck", "ProgramRunner", "Limits", "load_programs",
           "programs_from_source", "normalise_attention", "run_programs", "run_prefixwise", "check_causal"]


@dataclass(frozen=True)
class Program:
    name: str             # file stem, or "<file stem>.<function>" for reference-signature files
    path: str | None
    source: str
    description: str      # the docstring's first line
    docstring: str
    kind: str             # "tokens": attention(tokens) | "reference": f(sentence, tokenizer) -> (label, matrix)
    function: str
    trusted: bool = False  # written by the project itself: may run in-process


@dataclass
class ProgramRun:
    name: str
    status: str                    # "ok" or the first failure (a sandbox.STATUSES entry)
    error: str | None
    matrices: list = field(default_factory=list)  # per example: normalised float32 n x n, or None if it failed

    @property
    def n_failed(self) -> int:
        return sum(m is None for m in self.matrices)


# ---------------------------------------------------------------------------------------------------------
# Loading


def _is_reference_signature(fn: ast.FunctionDef) -> bool:
    args = fn.args
    positional = args.posonlyargs + args.args
    return len(positional) == 2 and "tok" in positional[1].arg.lower() and not args.kwonlyargs


def programs_from_source(source: str, name: str, *, path=None, trusted: bool = False) -> list[Program]:
    """The programs in one file's source (parsed, never run). `name` is the file stem.
    Raises ProgramError("syntax_error" | "rejected") for a file that does not parse or has neither signature."""
    where = str(path) if path else name
    try:
        tree = ast.parse(source, filename=where)
    except SyntaxError as e:
        raise ProgramError("syntax_error", f"{where}:{e.lineno}: {e.msg}") from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise ProgramError("syntax_error", f"{where}: cannot parse ({type(e).__name__})") from None
    module_doc = ast.get_docstring(tree) or ""
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}  # last def wins

    def make(program_name, fn, kind, doc):
        doc = doc.strip()
        description = doc.splitlines()[0].strip() if doc else fn.name.replace("_", " ")
        return Program(program_name, str(path) if path else None, source, description, doc, kind, fn.name,
                       trusted)

    if "attention" in functions and functions["attention"].args.args:
        return [make(name, functions["attention"], "tokens", module_doc)]
    reference = [fn for fn in functions.values() if _is_reference_signature(fn)]
    if not reference:
        raise ProgramError("rejected", f"{where}: no `attention(tokens)` function and no reference-signature "
                                       f"function `f(sentence, tokenizer)`")
    return [make(f"{name}.{fn.name}", fn, "reference", ast.get_docstring(fn) or module_doc) for fn in reference]


def load_programs(path, trusted: bool = False) -> list[Program]:
    """The programs in a `.py` file, or in every `.py` file of a folder (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        return [p for f in sorted(path.glob("*.py")) for p in load_programs(f, trusted)]
    if not path.is_file():
        raise FileNotFoundError(f"no program file or folder at {path}")
    return programs_from_source(path.read_text(), path.stem, path=path, trusted=trusted)


# ---------------------------------------------------------------------------------------------------------
# Normalisation and one call of a program


def normalise_attention(matrix, n: int | None = None, causal: bool = True) -> np.ndarray:
    """The one normalisation every consumer uses: float32 n x n, causal mask (when `causal`), NaN/inf and
    negatives set to 0, each row divided by its sum; a row left all zero attends to position 0."""
    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0] if n is None and m.ndim else n
    if m.shape != (n, n):
        raise ValueError(f"attention matrix has shape {m.shape}, expected ({n}, {n})")
    m = np.tril(m) if causal else m.copy()
    finite = np.isfinite(m)
    if not finite.all():
        m[~finite] = 0.0
    np.maximum(m, 0.0, out=m)
    with np.errstate(over="ignore"):
        sums = m.sum(axis=1)
    if not np.isfinite(sums).all():  # values near the float64 limit: scale each row by its largest first
        top = m.max(axis=1, keepdims=True)
        m = np.divide(m, top, out=np.zeros_like(m), where=top > 0)
        sums = m.sum(axis=1)
    empty = sums <= 0
    if empty.any():
        m[empty, 0] = 1.0
        sums[empty] = 1.0
    m /= sums[:, None]
    return m.astype(np.float32)


def describe_exception(e: BaseException, filename: str, source: str | None = None, trusted_section=None) -> str:
    """`<file>:<line>: <source line>: <Exception>: <message>`, naming the program's deepest line."""
    try:
        message = f"{type(e).__name__}: {e}"
    except BaseException:  # a custom exception whose __str__ fails
        message = type(e).__name__
    line = None
    if trusted_section is not None:
        trusted_section[0] = True  # the sandbox's audit hook lets the runner read frames meanwhile
    try:
        tb = e.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == filename:
                line = tb.tb_lineno
            tb = tb.tb_next
    except BaseException:
        pass
    finally:
        if trusted_section is not None:
            trusted_section[0] = False
    if line is None:
        return message
    text = source.splitlines()[line - 1].strip() if source and 0 < line <= len(source.splitlines()) else ""
    return f"{filename}:{line}: {text}: {message}" if text else f"{filename}:{line}: {message}"


def call_program(fn, kind: str, tokens, text, tokenizer=None, *, causal=True, last_row=False,
                 filename="<program>", source=None, trusted_section=None):
    """Call one program on one example. Returns ("ok", normalised float32 matrix, or its last row) or
    (failure status, message). Never raises."""
    n = len(tokens)
    try:
        result = fn(list(tokens)) if kind == "tokens" else fn(text, tokenizer)
    except MemoryError:
        return "memory", "MemoryError"
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # SystemExit too: a program cannot end the run
        return "runtime_error", describe_exception(e, filename, source, trusted_section)
    try:
        if kind == "reference" and isinstance(result, (tuple, list)) and len(result) == 2 \
                and isinstance(result[0], str):
            result = result[1]
        matrix = np.asarray(result)
        if matrix.dtype.kind not in "biuf":
            return "bad_output", f"output has dtype {matrix.dtype}, expected numbers"
        if matrix.shape != (n, n):
            return "bad_output", f"output has shape {matrix.shape}, expected ({n}, {n})"
        if n and not np.isfinite(matrix).any():
            return "bad_output", "output has no finite values"
        normalised = normalise_attention(matrix, n, causal)
    except MemoryError:
        return "memory", "MemoryError while reading the output"
    except BaseException as e:
        return "bad_output", f"unusable output: {type(e).__name__}: {e}"
    return "ok", normalised[-1] if last_row else normalised


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
    for status, error in zip(statuses, errors):
        if status != "ok":
            return ProgramRun(name, status, error, matrices)
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
