"""The lint: a fast first check of untrusted code, read without running it, with clear messages.

It is not the wall (the jail is), but it keeps honest programs to the documented API and turns the
obvious attacks away before anything starts: imports only from the allowed list, no dunder or private
attributes, no frame or traceback internals, no `str.format` attribute walks, no file I/O helpers, no
eval/exec/open/getattr/... A program that fails is `rejected` (or `syntax_error`) and never runs.

Limits apply per program, not per file: a reference library holds hundreds of programs in one file.
`check_program` takes what one program needs from its file (the module-level code, the function, and the
definitions they reach by name) and lints only that, so one bad function fails alone.
"""
import ast
import functools
import string
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..programs import ProgramError
from .policy import (ALLOWED_IMPORTS, ALLOWED_SUBMODULES, DENIED_ATTRIBUTES, DENIED_NAMES, MAX_FILE_CHARS,
                     MAX_PROGRAM_CHARS)

# Helpers whose values come from a spaCy parse: a program that names one gets its parses prepared in the
# warm worker, so that every program of a run shares them.
LINGUISTIC_HELPERS = frozenset({"prefix_docs", "pos", "syntactic_head", "syntactic_dependents",
                                "same_noun_phrase", "key_pos_is", "query_pos_is"})


@dataclass(frozen=True)
class CheckedProgram:
    """What the lint found one program needs from its file."""
    statements: tuple      # indexes of the file's top-level statements that run for this program
    lines: tuple           # their (first, last) lines, 1-based, decorators included: what the jail is sent
    imports: frozenset     # the modules its import statements name
    linguistic: bool       # names a helper that parses with spaCy


def importable(allowed_imports=ALLOWED_IMPORTS) -> set:
    """Every module name an import statement may name: the allowed list, the allowed submodules of allowed
    packages, and the parent packages of dotted names (`import attnprog.helpers` binds `attnprog`)."""
    names = set(allowed_imports)
    names.update(s for s in ALLOWED_SUBMODULES if s.split(".")[0] in names)
    for name in list(names):
        parts = name.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return names


def _format_fields(fmt: str):
    """The field names of a format string, including fields nested in format specs."""
    for _, name, spec, _ in string.Formatter().parse(fmt):
        if name is not None:
            yield name
        if spec:
            yield from _format_fields(spec)


def _check_format_literal(node: ast.Call) -> str | None:
    """`"...".format(...)` is fine when the literal's fields only name arguments (no `.attr`, no `[key]`)."""
    literal = node.func.value
    if not (isinstance(literal, ast.Constant) and isinstance(literal.value, str)):
        return "'.format' is only allowed on a string literal"
    try:
        fields = list(_format_fields(literal.value))
    except ValueError as e:
        return f"bad format string: {e}"
    if any("." in f or "[" in f for f in fields):
        return "format fields may not look up attributes or items"
    return None


def parse(source: str, filename: str) -> ast.Module:
    """The AST of a file. Raises ProgramError("syntax_error" | "rejected")."""
    if len(source) > MAX_FILE_CHARS:
        raise ProgramError("rejected", f"{filename}: file is longer than {MAX_FILE_CHARS} characters")
    try:
        return ast.parse(source, filename=filename)
    except SyntaxError as e:
        raise ProgramError("syntax_error", f"{filename}:{e.lineno}: {e.msg}") from None
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        raise ProgramError("syntax_error", f"{filename}: cannot parse ({type(e).__name__})") from None


def lint(nodes, filename: str, allowed_imports=ALLOWED_IMPORTS) -> None:
    """Check statements against the rules. Raises ProgramError("rejected", "<file>:<line>: <what>")."""
    def reject(node, what):
        raise ProgramError("rejected", f"{filename}:{getattr(node, 'lineno', '?')}: {what}")

    def check_attr(node, attr):
        if attr.startswith("_"):
            reject(node, f"attribute '{attr}' is not allowed (no private or dunder attributes)")
        if attr in DENIED_ATTRIBUTES:
            reject(node, f"attribute '{attr}' is not allowed")

    names = importable(allowed_imports)
    packages_only = names - set(allowed_imports) - set(ALLOWED_SUBMODULES)  # `attnprog`: only `helpers`
    allowed_text = ", ".join(allowed_imports)
    checked_format_calls = set()  # the `.format` attributes of calls on a checked string literal
    for node in (n for statement in nodes for n in ast.walk(statement)):  # a call comes before its `func`
        for field in ("name", "asname", "arg"):  # binding `__builtins__` would swap the builtins
            if getattr(node, field, None) == "__builtins__":
                reject(node, "the name '__builtins__' is not allowed")
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name not in names:
                    reject(node, f"import of '{alias.name}' is not allowed (allowed: {allowed_text})")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                reject(node, "relative imports are not allowed")
            if node.module not in names:
                reject(node, f"import from '{node.module}' is not allowed (allowed: {allowed_text})")
            for alias in node.names:
                if node.module == "__future__" or alias.name == "*":
                    continue
                check_attr(node, alias.name)
                if node.module in packages_only and f"{node.module}.{alias.name}" not in names:
                    reject(node, f"import of '{node.module}.{alias.name}' is not allowed (allowed: {allowed_text})")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
            problem = _check_format_literal(node)
            if problem:
                reject(node, problem)
            checked_format_calls.add(id(node.func))
        elif isinstance(node, ast.Attribute):
            if node.attr == "format":
                if id(node) not in checked_format_calls:
                    reject(node, "'.format' is only allowed as a call on a string literal")
            else:
                check_attr(node, node.attr)
        elif isinstance(node, ast.Name):
            if node.id in DENIED_NAMES:
                reject(node, f"name '{node.id}' is not allowed")
            if node.id.startswith("__") and node.id != "__name__":
                reject(node, f"name '{node.id}' is not allowed")
        elif isinstance(node, ast.MatchClass):
            for attr in node.kwd_attrs:
                check_attr(node, attr)
        elif isinstance(node, ast.keyword) and node.arg and node.arg.startswith("__"):
            reject(node, f"keyword '{node.arg}' is not allowed")  # type('X', (), {...}) and friends
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("__") \
                and node.value.endswith("__") and len(node.value) > 4 and node.value != "__main__":
            reject(node, f"the string {node.value!r} is not allowed (dunder names)")


def validate_source(source: str, filename: str = "<program>", allowed_imports=ALLOWED_IMPORTS) -> ast.Module:
    """Lint a whole file as one program; returns its AST. Raises ProgramError("syntax_error" | "rejected")."""
    tree = parse(source, filename)
    _check_size(source, tree.body, filename)
    lint(tree.body, filename, allowed_imports)
    return tree


def _check_size(source: str, statements, filename: str) -> None:
    lines = source.splitlines(keepends=True)
    size = sum(len(line) for s in statements for line in lines[s.lineno - 1:s.end_lineno])
    if size > MAX_PROGRAM_CHARS:
        raise ProgramError("rejected", f"{filename}: program is longer than {MAX_PROGRAM_CHARS} characters")


_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _names_used(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


# Caches, bounded: parsed files cost ~0.5 kB of host memory per character, so only the last two are kept
# (a library's programs are checked one after another); lint results are kept for sources totalling at
# most _CACHED_CHARS characters (each key holds its source).
_OUTLINES = 2
_CACHED_CHARS = 8_000_000
_cache_lock = threading.Lock()
_checked: "OrderedDict[tuple, dict]" = OrderedDict()   # (source, filename) -> {(function, imports): CheckedProgram}
_checked_chars = 0


@functools.lru_cache(maxsize=_OUTLINES)
def _file_outline(source: str, filename: str):
    """(AST, {defined name: statement indexes}, per statement: names it uses), parsed once per file (the
    lru_cache keys on the source text; its hash is computed once per string)."""
    tree = parse(source, filename)
    defined: dict = {}
    for i, statement in enumerate(tree.body):
        if isinstance(statement, _DEFINITIONS):
            defined.setdefault(statement.name, []).append(i)
    return tree, defined, [_names_used(statement) for statement in tree.body]


def program_statements(tree: ast.Module, defined: dict, uses: list, function: str) -> tuple:
    """The top-level statements program `function` needs: every statement that is not a definition (imports,
    constants, caches: they run for each program of the file) and the definitions reachable by name from
    those and from the function. A name with no definition stays undefined: calling it is that program's
    NameError."""
    if function not in defined:
        raise ProgramError("rejected", f"no function '{function}'")
    keep = {i for i, s in enumerate(tree.body) if not isinstance(s, _DEFINITIONS)}
    keep.update(defined[function])
    todo = list(keep)
    while todo:
        for name in uses[todo.pop()]:
            for i in defined.get(name, ()):
                if i not in keep:
                    keep.add(i)
                    todo.append(i)
    return tuple(sorted(keep))


def _cached_check(source: str, filename: str, function: str, allowed_imports) -> CheckedProgram:
    global _checked_chars
    key, inner = (source, filename), (function, allowed_imports)
    with _cache_lock:
        found = _checked.get(key, {}).get(inner)
        if found is not None:
            _checked.move_to_end(key)
            return found
    checked = _check_program(source, filename, function, allowed_imports)
    with _cache_lock:
        if key not in _checked:
            _checked[key] = {}
            _checked_chars += len(source)
        _checked[key][inner] = checked
        _checked.move_to_end(key)
        while _checked_chars > _CACHED_CHARS and len(_checked) > 1:
            (old_source, _), _ = _checked.popitem(last=False)
            _checked_chars -= len(old_source)
    return checked


def _check_program(source: str, filename: str, function: str, allowed_imports) -> CheckedProgram:
    tree, defined, uses = _file_outline(source, filename)
    try:
        statements = program_statements(tree, defined, uses, function)
    except ProgramError as e:
        raise ProgramError("rejected", f"{filename}: {e}") from None
    nodes = [tree.body[i] for i in statements]
    _check_size(source, nodes, filename)
    lint(nodes, filename, allowed_imports)
    imports, names = set(), set()
    for node in (n for statement in nodes for n in ast.walk(statement)):
        if isinstance(node, ast.Import):
            imports.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imports.add(node.module)
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Name):
            names.add(node.id)
    return CheckedProgram(statements, _line_ranges(tree, statements), frozenset(imports),
                          bool(names & LINGUISTIC_HELPERS))


def check_program(source: str, filename: str, function: str, allowed_imports=ALLOWED_IMPORTS) -> CheckedProgram:
    """Lint what program `function` of a file needs (cached per file and function).
    Raises ProgramError("syntax_error" | "rejected")."""
    return _cached_check(source, filename, function, tuple(allowed_imports))


def unchecked_program(source: str, filename: str, function: str) -> CheckedProgram:
    """What `check_program` finds, without the lint (the test-only unguarded policy)."""
    tree, defined, uses = _file_outline(source, filename)
    if function not in defined:
        statements = tuple(range(len(tree.body)))
        return CheckedProgram(statements, _line_ranges(tree, statements), frozenset(), False)
    statements = program_statements(tree, defined, uses, function)
    imports = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    return CheckedProgram(statements, _line_ranges(tree, statements), frozenset(imports), False)


def _line_ranges(tree: ast.Module, statements) -> tuple:
    ranges = []
    for i in statements:
        node = tree.body[i]
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", ())])
        ranges.append((first, node.end_lineno))
    return tuple(ranges)


def program_text(source: str, checked: CheckedProgram) -> str:
    """What the jail gets of a file for one program: the lines of the statements it needs, every other line
    blank (line numbers stay the file's). Other programs of a library file are not sent with it."""
    keep = bytearray(source.count("\n") + 2)
    for first, last in checked.lines:
        keep[first:last + 1] = b"\1" * (last + 1 - first)
    return "\n".join(line if keep[number] else "" for number, line in enumerate(source.split("\n"), start=1))
