"""What a sandboxed program sees: restricted builtins, and an import that hands out views of the allowed
modules (public names only, no modules hanging off them), stand-ins for the transformers tokenizer classes,
the model's tokenizer behind a narrow interface, and the one preloaded spaCy pipeline under whatever name a
program loads it (`spacy.load("en_core_web_sm")`, `import en_core_web_sm`).

The warm worker builds these before it forks a program's child; heavy modules (spaCy, NLTK) only when a
program imports them. Like the lint, this keeps programs to the documented API; the jail is the wall.
"""
import builtins
import importlib
import sys
import types
import warnings

from .policy import (ALLOWED_IMPORTS, ALLOWED_SUBMODULES, DENIED_ATTRIBUTES, DENIED_NAMES, HIDDEN_FROM_VIEWS,
                     SPACY_PIPELINE_MODULES, TRANSFORMERS_STUB_NAMES)
from .validation import importable


def _module_view(module: types.ModuleType, views: dict) -> types.ModuleType:
    """A copy of `module`'s public namespace without the modules that hang off it (allowed submodules stay,
    as views themselves). Assigning to a view never changes the real module."""
    if module.__name__ in views:
        return views[module.__name__]
    view = types.ModuleType(module.__name__, getattr(module, "__doc__", None))
    views[module.__name__] = view
    for name in dir(module):
        if name.startswith("_") or name in DENIED_ATTRIBUTES or name in HIDDEN_FROM_VIEWS:
            continue
        try:
            with warnings.catch_warnings():  # deprecated aliases (typing.re) warn when touched
                warnings.simplefilter("ignore")
                value = getattr(module, name)
        except Exception:  # lazy attributes that fail to load
            continue
        if isinstance(value, types.ModuleType):
            if value.__name__ in ALLOWED_SUBMODULES:
                setattr(view, name, _module_view(value, views))
            continue
        setattr(view, name, value)
    return view


class SharedPipeline:
    """The preloaded spaCy pipeline as programs get it: calling it on a text the worker has parsed already
    returns that parse (a program changing it changes only its own copy, in its own process)."""

    def __init__(self, nlp):
        self._nlp = nlp

    def __call__(self, text, *args, **kwargs):
        from .. import linguistics
        return linguistics.parse(text) if isinstance(text, str) and not args and not kwargs \
            else self._nlp(text, *args, **kwargs)

    def pipe(self, texts, *args, **kwargs):
        return (self(text) for text in texts)

    def __getattr__(self, name):
        if name.startswith("_") or name in DENIED_ATTRIBUTES:
            raise AttributeError(f"the sandbox's spaCy pipeline has no attribute '{name}'")
        return getattr(self._nlp, name)


def _spacy_views(views: dict) -> dict:
    """spaCy's view, its allowed submodules, and a stand-in module per pipeline name, all of whose `load`
    give the one preloaded pipeline."""
    from .. import linguistics
    import spacy
    pipeline = SharedPipeline(linguistics.english_pipeline())

    def load(name=None, *args, **kwargs):
        """The small English pipeline, whatever name is asked for (the only one the sandbox has)."""
        return pipeline

    out = {sub: _module_view(importlib.import_module(sub), views)
           for sub in ALLOWED_SUBMODULES if sub.startswith("spacy.")}
    out["spacy"] = _module_view(spacy, views)
    out["spacy"].load = load
    for module_name in SPACY_PIPELINE_MODULES:
        out[module_name] = types.ModuleType(module_name, "The small English spaCy pipeline (preloaded).")
        out[module_name].load = load
    return out


def _transformers_stub() -> types.ModuleType:
    stub = types.ModuleType("transformers", "Stand-ins for tokenizer classes (type annotations only).")
    for name in TRANSFORMERS_STUB_NAMES:
        setattr(stub, name, type(name, (), {}))
    return stub


class ModuleTable:
    """{import name: module view} for what programs may import. Light modules are loaded when the table is
    built; spaCy and NLTK when a program first imports them (`load`), in the worker, before the fork."""
    HEAVY = ("spacy", "en_core_web_sm", "nltk")

    def __init__(self, allowed_imports=ALLOWED_IMPORTS):
        self.allowed = importable(allowed_imports)
        self.views: dict = {}
        self.table: dict = {}
        self.load(name for name in self.allowed if name.split(".")[0] not in self.HEAVY)

    def load(self, names) -> None:
        """Make `names` importable (names outside the allowed list are ignored: importing them fails)."""
        for name in sorted(set(names) & self.allowed - set(self.table), key=len):
            top = name.split(".")[0]
            if top in ("spacy",) + SPACY_PIPELINE_MODULES:
                if "spacy" not in self.table:
                    self.table.update(_spacy_views(self.views))
                continue
            if name == "transformers":
                self.table[name] = _transformers_stub()
                continue
            try:
                module = importlib.import_module(name)
            except ImportError:  # not installed: importing it fails in the program
                continue
            self.table[name] = _module_view(module, self.views)
            if top == "nltk":  # its allowed submodules are views too
                for sub in ALLOWED_SUBMODULES:
                    if sub.startswith("nltk.") and sub not in self.table:
                        self.table[sub] = _module_view(importlib.import_module(sub), self.views)
        for name in sorted(self.table, key=len, reverse=True):  # parents of dotted names (`attnprog`)
            parts = name.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent not in self.table:
                    self.table[parent] = types.ModuleType(parent)
                if not hasattr(self.table[parent], parts[i]):
                    setattr(self.table[parent], parts[i], self.table[".".join(parts[:i + 1])])


def module_table(allowed_imports=ALLOWED_IMPORTS) -> dict:
    """Every allowed module as programs see it, spaCy and NLTK included (tests walk it for leaks)."""
    table = ModuleTable(allowed_imports)
    table.load(table.allowed)
    return table.table


def _restricted_import(table: dict):
    def restricted_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level:
            raise ImportError("relative imports are not allowed")
        if name in table:
            return table[name] if fromlist else table[name.split(".")[0]]
        # numpy's C code imports its own submodules lazily (ndarray.mean -> numpy._core._methods) with
        # PyImport_Import, which calls the running frame's __import__ but then takes the module from
        # sys.modules itself. Let those through when numpy has loaded the module, without handing it out.
        if name.startswith("numpy.") and name in sys.modules:
            return None
        raise ImportError(f"import of '{name}' is not allowed in the sandbox")
    return restricted_import


def safe_builtins(table: dict) -> dict:
    allowed = {k: v for k, v in vars(builtins).items() if k not in DENIED_NAMES and not k.startswith("_")}
    allowed["__build_class__"] = builtins.__build_class__  # the `class` statement needs it
    allowed["__import__"] = _restricted_import(table)
    return allowed


class ReferenceTokenizer:
    """The model's tokenizer as reference programs see it: calling it and the usual lookups, nothing that
    reaches files or the Rust tokenizer behind it. `return_tensors="pt"` gives numpy arrays, since torch is
    not loaded in the sandbox (`.input_ids[0]`, `len`, `.tolist()` behave the same)."""
    METHODS = frozenset({"encode", "decode", "batch_decode", "tokenize", "convert_ids_to_tokens",
                         "convert_tokens_to_ids", "convert_tokens_to_string", "get_vocab", "encode_plus",
                         "batch_encode_plus"})
    ATTRIBUTES = frozenset({"vocab_size", "model_max_length", "padding_side", "all_special_tokens",
                            "all_special_ids"} |
                           {f"{kind}_token{suffix}" for kind in ("bos", "eos", "unk", "pad", "sep", "cls", "mask")
                            for suffix in ("", "_id")})

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, *args, **kwargs):
        if kwargs.get("return_tensors") == "pt":
            kwargs["return_tensors"] = "np"
        return self._tokenizer(*args, **kwargs)

    def __len__(self):
        return len(self._tokenizer)

    def __getattr__(self, name):
        if name in self.METHODS or name in self.ATTRIBUTES:
            return getattr(self._tokenizer, name)
        raise AttributeError(f"the sandbox's tokenizer has no attribute '{name}'")


def load_reference_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return ReferenceTokenizer(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
