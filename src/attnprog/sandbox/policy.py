"""What a sandboxed program may do: the imports and names the lint allows, the size limits, the resource
limits of one run, and the switches tests use to turn the Python-level guards off.

The operating-system jail (jail.py) is the wall and is always on; everything here is a fast first check
that gives honest code clear messages and keeps programs to the documented API.
"""
from dataclasses import dataclass

from ..programs import MAX_FILE_CHARS  # noqa: F401  (a whole file; checked where files are read)

# Modules a program may import. Each is handed out as a view (namespace.py): public names only, no modules
# hanging off it except the submodules listed below.
ALLOWED_IMPORTS = ("numpy", "math", "re", "collections", "itertools", "functools", "typing", "__future__",
                   "string", "attnprog.helpers", "transformers", "spacy", "en_core_web_sm", "nltk")
ALLOWED_SUBMODULES = ("numpy.linalg", "numpy.fft", "numpy.random", "numpy.lib", "numpy.lib.stride_tricks",
                      "spacy.tokens", "spacy.symbols", "spacy.matcher",
                      "nltk.tokenize", "nltk.stem", "nltk.util", "nltk.corpus", "nltk.tag")
# Reference programs import tokenizer classes from transformers for type annotations only; they get stand-ins.
TRANSFORMERS_STUB_NAMES = ("PreTrainedTokenizerBase", "PreTrainedTokenizer", "PreTrainedTokenizerFast",
                           "AutoTokenizer")
# Module names under which programs load the small English spaCy pipeline; each gives the one preloaded.
SPACY_PIPELINE_MODULES = ("en_core_web_sm",)

DENIED_NAMES = frozenset({
    "eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "globals", "locals", "vars", "dir",
    "__import__", "breakpoint", "input", "help", "exit", "quit", "memoryview", "copyright", "credits",
    "license"})
DENIED_ATTRIBUTES = DENIED_NAMES | frozenset({
    # modules that hang off allowed ones (tests/test_sandbox.py walks every allowed module to keep this complete)
    "builtins", "sys", "os", "subprocess", "inspect", "operator", "types", "warnings", "contextlib",
    "copyreg", "enum", "abc", "textwrap", "ctypes", "ctypeslib", "f2py", "testing", "distutils",
    "importlib", "pickle", "io", "socket", "shutil", "unicodedata", "mtrand", "bit_generator", "npyio",
    # frames, code objects and tracebacks lead back to the runner's globals
    "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "ag_frame", "ag_code",
    "ag_await", "f_back", "f_globals", "f_locals", "f_builtins", "f_code", "f_trace", "tb_frame", "tb_next",
    "with_traceback",
    # format strings look attributes up by name; `.format` on a literal is checked separately
    "format_map", "vformat", "get_field", "Formatter",
    # file I/O (`load` stays: `spacy.load` hands out the preloaded pipeline; numpy's view has no `load`)
    "save", "savez", "savez_compressed", "savetxt", "loadtxt", "genfromtxt", "fromfile", "tofile",
    "dump", "dumps", "memmap", "open_memmap", "DataSource", "fromregex", "to_disk", "from_disk",
    "save_pretrained", "from_pretrained", "download",
    # reads and writes memory outside the array (sliding_window_view is the checked alternative)
    "as_strided"})
# Left out of module views on top of DENIED_ATTRIBUTES.
HIDDEN_FROM_VIEWS = frozenset({"load"})

MAX_PROGRAM_CHARS = 100_000   # one program: its function, the helpers it uses and the module-level code
MAX_TOKENS = 4096             # longest token list a sandboxed program is called on
MAX_ERROR_BYTES = 2000        # longest error message a child may send


@dataclass(frozen=True)
class Limits:
    """What one sandboxed program run may use. A run is one program called on a batch of examples."""
    seconds_per_call: float = 2.0   # CPU and wall clock per call (setting the module up counts as one)
    memory_mb: int = 1024           # address space the program may add to the pre-warmed worker


@dataclass(frozen=True)
class Policy:
    """The Python-level guards. The workflow always uses the default; tests switch them off to hand a
    program the real builtins and any module (`ctypes`, `os`): a complete Python-level escape, which the
    jail must contain on its own."""
    python_guards: bool = True      # the lint, restricted builtins, module views
    allowed_imports: tuple = ALLOWED_IMPORTS


UNGUARDED = Policy(python_guards=False)
