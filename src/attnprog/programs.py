"""Attention programs: the file format, loading, and calling one program on one example.

A program is a standalone `.py` file: a module docstring saying in plain English what the head does, and

    def attention(tokens: list[str]) -> numpy.ndarray:   # n x n, row i = where token i attends

Files written to the reference code's signature, `prog(sentence: str, tokenizer) -> (label, matrix)`, load
too, as one program `<file stem>.<function>` per program function. They are called with the example's text
and the model's tokenizer; a matrix whose size is not the example's token count is `bad_output`. Such files
hold helpers as well, some with the same two parameters, so a function is a program when
  1. it is a top-level function with two positional parameters, the second named like a tokenizer
     (`tokenizer`, `tok`, ...), and
  2. it returns a labelled pair (some `return` gives a 2-tuple whose first item is a string literal or
     f-string: the reference contract `(label, matrix)`), or no other function of the file calls it (a
     function the file's code uses is a helper; a registry of programs at module level does not count).

Every output goes through `attnprog.matrices.normalise` (causal mask, negatives and non-finite values to 0,
rows summing to 1, an all-zero row attending to position 0) before anyone scores or substitutes it.

This module is a leaf: the in-process runner (`attnprog.runner`) and the sandbox's children both call
`call_program`; neither is imported here.
"""
import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contracts import PROGRAM_STATUSES
from .matrices import normalise


# Longest program file read: about twice the largest published reference library (hundreds of programs,
# ~0.6-1 MB). Checked before a file is parsed, reading no more than this: the host's parse costs ~0.5 kB per
# character, so the limit bounds the host's memory (a 20 M-character file costs only its first 2 M).
MAX_FILE_CHARS = 2_000_000


class ProgramError(ValueError):
    """A program that cannot be loaded or run; `status` is one of contracts.PROGRAM_STATUSES."""

    def __init__(self, status: str, message: str):
        if status not in PROGRAM_STATUSES:
            raise ValueError(f"unknown program status {status!r}")
        super().__init__(message)
        self.status = status

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


# ---------------------------------------------------------------------------------------------------------
# Loading


def _is_reference_signature(fn: ast.FunctionDef) -> bool:
    args = fn.args
    positional = args.posonlyargs + args.args
    return len(positional) == 2 and "tok" in positional[1].arg.lower() and not args.kwonlyargs


def _own_nodes(fn):
    """The nodes of a function's body, without those of functions, lambdas and classes nested in it."""
    todo = list(fn.body)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(node))


def _returns_labelled_pair(fn: ast.FunctionDef) -> bool:
    return any(isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and len(node.value.elts) == 2
               and (isinstance(node.value.elts[0], ast.JoinedStr) or
                    (isinstance(node.value.elts[0], ast.Constant) and isinstance(node.value.elts[0].value, str)))
               for node in _own_nodes(fn))


def _called_by_other_functions(tree: ast.Module) -> set:
    """Names used inside each top-level function or class other than the one of that name."""
    used = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            used |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id != node.name}
    return used


def programs_from_source(source: str, name: str, *, path=None, trusted: bool = False) -> list[Program]:
    """The programs in one file's source (parsed, never run). `name` is the file stem.
    Raises ProgramError("syntax_error" | "rejected") for a file that does not parse or has neither signature."""
    where = str(path) if path else name
    if len(source) > MAX_FILE_CHARS:
        raise ProgramError("rejected", f"{where}: file is longer than {MAX_FILE_CHARS} characters")
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
    helpers = _called_by_other_functions(tree)
    reference = [fn for fn in functions.values() if _is_reference_signature(fn)
                 and (_returns_labelled_pair(fn) or fn.name not in helpers)]
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
    return programs_from_source(read_program_file(path), path.stem, path=path, trusted=trusted)


def read_program_file(path) -> str:
    """A program file's text, reading at most MAX_FILE_CHARS + 1 characters.
    Raises ProgramError("rejected") naming the file when it is longer or not UTF-8 text."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read(MAX_FILE_CHARS + 1)
    except UnicodeDecodeError as e:
        raise ProgramError("rejected", f"{path}: not UTF-8 text ({e.reason})") from None
    if len(source) > MAX_FILE_CHARS:
        raise ProgramError("rejected", f"{path}: file is longer than {MAX_FILE_CHARS} characters")
    return source

# ---------------------------------------------------------------------------------------------------------
# Normalisation and one call of a program


def describe_exception(e: BaseException, filename: str, source: str | None = None) -> str:
    """`<file>:<line>: <source line>: <Exception>: <message>`, naming the program's deepest line."""
    try:
        message = f"{type(e).__name__}: {e}"
    except BaseException:  # a custom exception whose __str__ fails
        message = type(e).__name__
    line = None
    try:
        tb = e.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == filename:
                line = tb.tb_lineno
            tb = tb.tb_next
    except BaseException:
        pass
    if line is None:
        return message
    text = source.splitlines()[line - 1].strip() if source and 0 < line <= len(source.splitlines()) else ""
    return f"{filename}:{line}: {text}: {message}" if text else f"{filename}:{line}: {message}"


def call_program(fn, kind: str, tokens, text, tokenizer=None, *, causal=True, last_row=False,
                 filename="<program>", source=None):
    """Call one program on one example. Returns ("ok", normalised float32 matrix, or its last row) or
    (failure status, message). Never raises. numpy's global random state is seeded (0) before each call, so
    a program using unseeded `np.random` gives the same output on every run. It is not restored afterwards:
    saving and restoring it would cost 0.25 ms a call, more than many programs take, and nothing in the
    processes that run programs draws from it."""
    n = len(tokens)
    np.random.seed(0)
    try:
        result = fn(list(tokens)) if kind == "tokens" else fn(text, tokenizer)
    except MemoryError:
        return "memory", "MemoryError"
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # SystemExit too: a program cannot end the run
        return "runtime_error", describe_exception(e, filename, source)
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
        normalised = normalise(matrix, n, causal)
    except MemoryError:
        return "memory", "MemoryError while reading the output"
    except BaseException as e:
        return "bad_output", f"unusable output: {type(e).__name__}: {e}"
    return "ok", normalised[-1] if last_row else normalised

