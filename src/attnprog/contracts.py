"""What passes between the workflow's rules, written once: typed records and table schemas.

Every writer and reader of a file that crosses a rule boundary goes through this module, and so do the
tests' fixtures, so the two sides cannot drift apart. Tables are checked when written (columns, types,
allowed values) and when read (columns and types). docs/ARCHITECTURE.md lists which rule writes which file.

The hundreds of per-head jobs exchange .npz files and import only numpy from here: pyarrow (a tenth of a
second to import) is loaded only when a Parquet table is read or written.
"""
from __future__ import annotations

import json
import os
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Union, get_args, get_origin

import numpy as np

from .atomic import atomic_path, write_json


class ContractError(ValueError):
    """A file that does not hold what its contract says, named in one line."""


# ---------------------------------------------------------------------------------------------------------
# Vocabulary

Split = Literal["synth", "val", "test"]
SPLITS: tuple[Split, ...] = get_args(Split)
# What a program run can end in; the sandbox and the in-process runner report the same statuses.
ProgramStatus = Literal["ok", "syntax_error", "rejected", "runtime_error", "timeout", "memory", "bad_output"]
PROGRAM_STATUSES: tuple[str, ...] = get_args(ProgramStatus)
# A candidate can also fail before it is a program: an LLM reply without code, cut off, refused, too long;
# or its file went missing.
CandidateStatus = Literal[ProgramStatus, "no_program", "truncated", "api_error", "prompt_too_long", "missing"]
CANDIDATE_STATUSES: tuple[str, ...] = PROGRAM_STATUSES + ("no_program", "truncated", "api_error",
                                                          "prompt_too_long", "missing")
# Who wrote a program (hybrid: an LLM improving an offline fit). Only the project's own offline synthesizer is
# trusted to run outside the sandbox.
Origin = Literal["offline", "claude", "open_weights", "hybrid", "user"]
ORIGINS: tuple[str, ...] = get_args(Origin)
TRUSTED_ORIGINS = ("offline",)


def is_trusted(origin: str) -> bool:
    """Whether a program of this origin runs in-process (trusted) or in the jail: the one place that decides,
    for reranking (Candidate.trusted) and substitution (programs.parquet's `trusted`, written by the library)."""
    return origin in TRUSTED_ORIGINS


_HEAD_NAME = re.compile(r"L(\d+)H(\d+)")


class HeadId(NamedTuple):
    """One attention head of a model. `name` is the one way a head is written (`L3H5`: folder and file names,
    pages, messages) and `parse` the one way such a name is read back. A named pair, so it equals, hashes and
    sorts as the plain (layer, head) pair: tables' (layer, head) keys and HeadId keys find each other."""
    layer: int
    head: int

    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}"

    @classmethod
    def parse(cls, name: str) -> "HeadId":
        """The head a name such as "L3H5" stands for; ContractError for anything else."""
        match = _HEAD_NAME.fullmatch(name) if isinstance(name, str) else None
        if match is None:
            raise ContractError(f"{name!r} is not a head name (expected L<layer>H<head>, e.g. L3H5)")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return self.name


def all_heads(n_layers: int, n_heads: int) -> list[HeadId]:
    return [HeadId(layer, head) for layer in range(n_layers) for head in range(n_heads)]


# ---------------------------------------------------------------------------------------------------------
# JSON records

def read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ContractError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise ContractError(f"{path} is not valid JSON ({e})") from None


def _conforms(value, hint) -> bool:
    """Whether a value read from JSON has the declared type (JSON numbers: an int is also a float; a
    bool is neither)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is typing.Any or hint is object:
        return True
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arm) for arm in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if is_dataclass(hint):
        return isinstance(value, (dict, hint))
    if hint is list or origin is list:
        return isinstance(value, list) and (not args or all(_conforms(v, args[0]) for v in value))
    if hint is dict or origin is dict:
        return isinstance(value, dict) and (not args or all(_conforms(k, args[0]) and _conforms(v, args[1])
                                                            for k, v in value.items()))
    raise TypeError(f"no JSON check for type {hint}")


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True)
class JsonRecord:
    """A JSON file as a frozen record: `write` writes it atomically, `read` checks every declared field (present
    unless it has a default; of its declared type) and raises a one-line ContractError naming the file and the
    field. Keys the record does not declare are ignored, so a file with more (a later version) still reads.
    A field typed as another JsonRecord (or a list of them) is read as that record."""

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, path) -> None:
        """Check the record as `read` will (a writer's wrong type fails here, naming the field), then write it."""
        data = self.to_dict()
        type(self).from_dict(data, f"{path} (writing)")
        write_json(path, data)

    @classmethod
    def from_dict(cls, data, where: str):
        return _from_dict(cls, data, where)

    @classmethod
    def read(cls, path):
        return cls.from_dict(read_json(path), str(path))


def _from_dict(cls, data, where: str):
    """A contract dataclass from a JSON object: every field present unless it has a default and of its declared
    type, nested contract dataclasses (or lists of them) built too, keys it does not declare ignored (a file
    with more, a later version, still reads). Anything else: a one-line ContractError naming `where` and the
    field."""
    if not isinstance(data, dict):
        raise ContractError(f"{where}: expected a JSON object, found {_type_name(data)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ContractError(f"{where}: missing field {f.name}")
            continue
        value, hint = data[f.name], hints[f.name]
        if not _conforms(value, hint):
            raise ContractError(f"{where}: field {f.name} is {json.dumps(value)[:60]} ({_type_name(value)}), "
                                f"expected {_hint_name(hint)}")
        values[f.name] = _nested(value, hint, f"{where}: {f.name}")
    return cls(**values)


def _nested(value, hint, where: str):
    """A field's value with its nested records (a record, or a list of records) read as records."""
    arms = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) in (Union, types.UnionType) \
        else [hint]
    for arm in arms:
        if is_dataclass(arm) and isinstance(value, dict):
            return _from_dict(arm, value, where)
        inner = get_args(arm)
        if get_origin(arm) is list and inner and is_dataclass(inner[0]):
            return [_from_dict(inner[0], v, f"{where}[{k}]") if isinstance(v, dict) else v for k, v in enumerate(value)]
    return value


def _hint_name(hint) -> str:
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


@dataclass(frozen=True)
class ModelInfo(JsonRecord):
    """results/{model}/model/info.json: what later stages need to know about a model (no weights)."""
    model: str
    load_path: str                 # what `from_pretrained` loads: a Hub id or a local folder
    architecture: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    is_causal: bool
    dtype: str = "float32"
    revision: str | None = None

    @property
    def heads(self) -> list[HeadId]:
        return all_heads(self.n_layers, self.n_heads)

    @property
    def n_heads_total(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def tokenizer_dir(self) -> str | None:
        """The model's local folder (reference-signature programs tokenise with it), if it has one."""
        return self.load_path if Path(self.load_path).is_dir() else None


USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


@dataclass
class Candidate:
    """One candidate program of a head, as synthesis recorded it (an entry of manifest.json)."""
    name: str                      # L{l}H{h}_c{i} (first turn or offline fit i), _r0 (refined); beside offline: _l{i}, _lr0, _h0
    file: str | None               # its file in the head's synthesis folder (None: the reply held no program)
    origin: Origin
    status: CandidateStatus = "ok"
    error: str | None = None
    synth_jsd: float | None = None
    synth_iou: float | None = None
    n_terms: int | None = None     # offline programs: how many weighted cues
    refined_from: str | None = None
    prompt_hash: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    from_cache: bool = False

    def __post_init__(self):
        if self.origin not in ORIGINS:
            raise ContractError(f"candidate {self.name}: origin {self.origin!r} is not one of {ORIGINS}")
        if self.status not in CANDIDATE_STATUSES:
            raise ContractError(f"candidate {self.name}: status {self.status!r} is not one of {CANDIDATE_STATUSES}")

    @property
    def trusted(self) -> bool:
        return is_trusted(self.origin)


@dataclass
class Manifest:
    """results/{model}/synthesis/L{l}H{h}/manifest.json: one head's candidates and what they cost."""
    model: str
    layer: int
    head: int
    backend: str
    candidates: list[Candidate]
    totals: dict = field(default_factory=dict)
    explainer_model: str | None = None
    replies: list[dict] = field(default_factory=list)

    FILE = "manifest.json"

    @property
    def head_id(self) -> HeadId:
        return HeadId(self.layer, self.head)

    def write(self, folder) -> None:
        data = asdict(self)
        write_json(Path(folder) / self.FILE, data)

    @classmethod
    def read(cls, folder) -> "Manifest":
        path = Path(folder) / cls.FILE
        return _from_dict(cls, read_json(path), str(path))


# ---------------------------------------------------------------------------------------------------------
# Each stage's summary (the small JSON files the report reads; docs/ARCHITECTURE.md describes each field)

@dataclass(frozen=True)
class LibrarySummary(JsonRecord):
    """results/{model}/library/summary.json, written by the `library` rule."""
    model: str
    n_heads: int
    n_candidates: int              # before deduplication
    pool_size: int
    library_size: int
    mean_val_iou: float            # each head's program from the library
    mean_test_iou: float
    mean_synth_iou: float
    unrestricted: dict[str, float]  # each head choosing from the whole pool: mean_{split}_{measure}, programs_used
    library_curve: list[dict[str, float]]  # per library size: size, mean_{split}_{measure} (iou, output_error)
    mean_terms: float | None       # of the chosen programs (None: none has a term count)
    heads_per_program: dict[str, int]
    baselines: dict[str, float]    # mean test IoU per baseline
    per_layer_test_iou: dict[str, float]
    n_causal_programs: int
    splits: dict[str, int]         # examples per split
    selection: str                 # how the library and each head's program were chosen, in words
    # library.choose_by, and the mean relative output error of each head's program (None without value Grams);
    # defaults: summaries written before the setting existed chose by IoU and recorded no output error
    choose_by: str = "iou"
    mean_val_output_error: float | None = None
    mean_test_output_error: float | None = None


@dataclass(frozen=True)
class HeadlineMethod(JsonRecord):
    """The sweep method chosen on val (substitution summary's `best`), with its cost on the main split."""
    method: str
    chosen_on: str | None
    rel_increase: dict[str, float]             # {fraction: relative perplexity increase}
    interval: dict[str, list[float]] | None


@dataclass(frozen=True)
class SingleHeadStats(JsonRecord):
    """How each head's test IoU ranks the cost of replacing it alone (`spearman_rho`, `p_value`: against the
    perplexity increase, the paper's measure; `iou_kl`: against the measured KL to the unmodified model), and
    how the attribution order's estimate of that KL ranks the measured KL (`estimated_kl`)."""
    n_heads: int
    iou: str
    spearman_rho: float
    p_value: float
    estimated_kl: dict[str, float] | None = None   # spearman_rho, p_value
    iou_kl: dict[str, float] | None = None         # spearman_rho, p_value


@dataclass(frozen=True)
class SubstitutionSummary(JsonRecord):
    """results/{model}/substitution/summary.json, written by the `substitute` rule. `splits` holds, per
    evaluation set, the baseline perplexity and per method `{fraction: relative increase}` (with
    `<method>_interval`, `random_range`), and under `kl` per method `{fraction: KL(unmodified || substituted)
    in nats per token}` (with `kl_interval`; random: the mean over seeds); the file also repeats the main
    split's entries at its top level."""
    model: str
    split: str                     # the main evaluation set (heldout when there is one)
    baseline_ppl: float
    n_tokens: int
    baseline_ppl_interval: list[float]
    best: HeadlineMethod
    n_replaced: dict[str, int]
    splits: dict[str, dict]
    program_failures: int = 0      # examples where a program failed and the uniform matrix stood in
    single_head: SingleHeadStats | None = None
    tuning: dict | None = None     # the `tuned` method's stages and test IoU (with that method only)

    def to_dict(self) -> dict:
        return {**self.splits[self.split], **asdict(self)}

    def rel_increase(self, method: str, split: str | None = None) -> dict[str, float]:
        """`{fraction: relative perplexity increase}` of a method on a split (the main one by default)."""
        return self.splits[split or self.split][method]


@dataclass(frozen=True)
class QASummary(JsonRecord):
    """results/{model}/qa/summary.json, written by the `qa_summary` rule."""
    model: str
    metrics: dict[str, str | None]              # {task: the metric its paired fields compare}
    tasks: dict[str, dict[str, dict[str, dict]]]  # {task: {method: {fraction: row}}}
    results: list[dict]                         # the same rows flat, with task, method and fraction
    max_drop: dict[str, float]                  # {fraction: largest drop of any task, programs replaced}


@dataclass(frozen=True)
class TransferProgram(JsonRecord):
    """A library program chosen for some head of the target model."""
    name: str
    description: str
    heads: int                     # target heads that chose it
    universal_heads: int           # of which within the margin of their own program
    mean_test_iou: float


@dataclass(frozen=True)
class TransferHead(JsonRecord):
    """One target head: the source program best on val, and the target's own program."""
    layer: int
    head: int
    program: str
    val_iou: float
    test_iou: float
    own_program: str | None
    own_test_iou: float

    @property
    def head_id(self) -> HeadId:
        return HeadId(self.layer, self.head)


@dataclass(frozen=True)
class TransferSummary(JsonRecord):
    """results/transfer/{source}/{target}.json, written by the `transfer` rule: the source model's library run
    on the target model's examples and scored against its heads."""
    library_model: str
    target_model: str
    n_programs: int
    n_heads: int
    mean_test_iou: float           # target heads under the source library
    own_mean_test_iou: float       # target heads under their own library
    programs_used: int
    universal_margin: float
    universal_heads: int
    programs: list[TransferProgram]
    heads: list[TransferHead]
    failed_examples: dict[str, dict[str, int]]  # {split: {program: examples it failed on}}


@dataclass(frozen=True)
class SourceScore(JsonRecord):
    """One source of candidates on the LLM-sampled heads: each head's best candidate of this source, chosen
    on val among its causal programs that ran, reported on test (a head with none scores IoU 0)."""
    source: str                    # offline | llm | hybrid | all
    mean_val_iou: float
    mean_test_iou: float
    heads_with_program: int        # sampled heads where this source has a causal program that ran
    mean_test_output_error: float | None = None


@dataclass(frozen=True)
class CandidateShares(JsonRecord):
    """What became of one origin's candidates on the sampled heads (shares of `n`)."""
    origin: str
    n: int
    parsed: float                  # the reply held a complete program that parses
    ran: float                     # it passed the jail's checks and ran on every split
    ran_and_causal: float          # ... and passed the causality check: usable by the library


@dataclass(frozen=True)
class ExplainerComparison(JsonRecord):
    """results/{model}/library/explainers.json, written by the `explainers` rule (synthesis.llm): the LLM
    explainer beside the offline synthesizer on the sampled heads."""
    model: str
    backend: str
    explainer_model: str | None
    heads: list[str]               # the sampled heads, by name
    sources: list[SourceScore]
    candidates: list[CandidateShares]
    seconds_per_head: dict[str, float]   # {turn kind: mean generation seconds per head} (first, refinement, hybrid)
    tokens_per_head: dict[str, float]    # {input_tokens, output_tokens}: mean per head, every turn
    replies_from_cache: float            # share of this run's replies read from the reply cache (a rerun: 1.0)
    library_programs: dict[str, int]     # {origin: programs in the model's library}
    chosen_on_sampled: dict[str, int]    # {origin: sampled heads whose chosen library program has this origin}


# ---------------------------------------------------------------------------------------------------------
# Parquet tables

@dataclass(frozen=True)
class Table:
    """A Parquet file's contract: its columns with their Arrow types ("int64", "string", "list<float32>",
    ...), and the values some string columns may take."""
    name: str
    fields: tuple[tuple[str, str], ...]
    allowed: dict = field(default_factory=dict)   # column -> allowed values

    @property
    def columns(self) -> list[str]:
        return [name for name, _ in self.fields]

    @property
    def schema(self):
        """The pyarrow schema (built on first use)."""
        import pyarrow as pa

        def arrow(kind: str):
            if kind.startswith("list<"):
                return pa.list_(arrow(kind[5:-1]))
            return {"string": pa.string(), "bool": pa.bool_()}.get(kind) or getattr(pa, kind)()

        return pa.schema([(name, arrow(kind)) for name, kind in self.fields])

    def conform(self, data):
        """A DataFrame, Arrow table or list of row dicts as exactly this schema (columns in order, types
        cast); raises ContractError for a missing or extra column, an uncastable value or a value not allowed."""
        import pyarrow as pa

        if isinstance(data, list):  # rows as dicts
            data = pa.table({c: [row.get(c) for row in data] for c in
                             dict.fromkeys(k for row in data for k in row)} if data else
                            {c: [] for c in self.columns})
        table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False)
        missing = [c for c in self.columns if c not in table.column_names]
        extra = [c for c in table.column_names if c not in self.columns]
        if missing or extra:
            raise ContractError(f"{self.name}: columns differ from the contract (missing {missing}, extra {extra})")
        try:
            table = table.select(self.columns).cast(self.schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise ContractError(f"{self.name}: {e}") from None
        for column, values in self.allowed.items():
            seen = set(table[column].drop_null().unique().to_pylist())
            bad = sorted(seen - set(values))
            if bad:
                raise ContractError(f"{self.name}: column {column} has value(s) {bad[:3]} (allowed: {values})")
        return table

    def write(self, data, path) -> None:
        """Check `data` against the contract and write it atomically."""
        import pyarrow.parquet as pq

        table = self.conform(data)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)

    def read_arrow(self, path, columns: list[str] | None = None, filters=None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not Path(path).is_file():
            raise ContractError(f"{self.name}: missing file {path}")
        found, schema = pq.read_schema(path), self.schema
        columns = columns or self.columns
        declared = dict(self.fields)
        for name in columns:
            if name not in found.names:
                raise ContractError(f"{self.name}: {path} has no column {name} (written by an earlier version? "
                                    "rerun the rule that writes it: snakemake --forcerun <rule>)")
            if _plain(found.field(name).type) != _plain(schema.field(name).type):
                raise ContractError(f"{self.name}: {path} column {name} is {found.field(name).type}, "
                                    f"expected {declared[name]}")
        table = pq.read_table(path, columns=columns, filters=filters)
        return table.cast(pa.schema([schema.field(name) for name in columns]))

    def read(self, path, columns: list[str] | None = None, filters=None):
        """The file as a pandas DataFrame, after checking its schema."""
        return self.read_arrow(path, columns, filters).to_pandas()


def _plain(kind) -> str:
    """An Arrow type's name with the variants writers differ in folded together: 64-bit offsets
    (large_string, large_list, as pandas may write them) and a list's item-field name."""
    import pyarrow as pa

    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return f"list<{_plain(kind.value_type)}>"
    return "string" if pa.types.is_large_string(kind) else str(kind)


# results/{model}/data/examples.parquet and heldout.parquet (split "heldout"): one row per example.
EXAMPLES = Table("examples", (("example_id", "int64"), ("split", "string"), ("text", "string"),
                              ("input_ids", "list<int64>"), ("tokens", "list<string>")),
                 {"split": SPLITS + ("heldout",)})

# results/{model}/attention/layer{L}.parquet: one row per (example, head), the lower triangle row by row.
ATTENTION = Table("attention", (("example_id", "int64"), ("head", "int32"), ("n", "int32"),
                                ("attention", "list<float32>")))

# results/{model}/value_grams/layer{L}.parquet (only with synthesis.offline.objective: output): one row per
# (example, head), the lower triangle of G = U U^T row by row, U (n x model width) the head's value vectors
# projected by its slice of the output projection. G is symmetric; the triangle holds all of it.
VALUE_GRAMS = Table("value_grams", (("example_id", "int64"), ("head", "int32"), ("n", "int32"),
                                    ("gram", "list<float32>")))

# results/{model}/library/programs.parquet: the deduplicated pool of programs. `in_library`: chosen for the
# library (its file is in library/programs/); `library_rank`: the step of the set cover that chose it.
PROGRAMS = Table("programs", (
    ("name", "string"), ("origin", "string"), ("source_layer", "int32"), ("source_head", "int32"),
    ("description", "string"), ("category", "string"), ("causal", "bool"), ("trusted", "bool"),
    ("n_terms", "int32"), ("source_chars", "int64"), ("in_library", "bool"), ("library_rank", "int32")),
    {"origin": ORIGINS})

# results/{model}/library/scores.parquet: every program on every head, per split. `output_error`: the relative
# output error (ProgramScore), null where extraction recorded no value Grams.
SCORES = Table("scores", (("program", "string"), ("layer", "int32"), ("head", "int32"), ("split", "string"),
                          ("iou", "float64"), ("jsd", "float64"), ("output_error", "float64")), {"split": SPLITS})

# results/{model}/library/best.parquet: each head's program (chosen on val by library.choose_by, val IoU by
# default; test reports it), its IoU and relative output error (null without value Grams) per split.
BEST = Table("best", (("layer", "int32"), ("head", "int32"), ("program", "string"), ("val_iou", "float64"),
                      ("test_iou", "float64"), ("synth_iou", "float64"), ("causal", "bool"),
                      ("val_output_error", "float64"), ("test_output_error", "float64"),
                      ("synth_output_error", "float64")))

# results/{model}/library/baselines.parquet
BASELINES = Table("baselines", (("baseline", "string"), ("layer", "int32"), ("head", "int32"),
                                ("split", "string"), ("iou", "float64")), {"split": SPLITS})

# results/{model}/substitution/sweep.parquet: one row per (run, evaluation set).
SWEEP = Table("sweep", (
    ("method", "string"), ("seed", "int64"), ("fraction", "float64"), ("n_replaced", "int64"), ("split", "string"),
    ("n_tokens", "int64"), ("ppl", "float64"), ("ppl_lo", "float64"), ("ppl_hi", "float64"),
    ("rel_increase", "float64"), ("rel_lo", "float64"), ("rel_hi", "float64"),
    ("kl", "float64"), ("kl_lo", "float64"), ("kl_hi", "float64")))  # KL(unmodified || run), nats per token

# results/{model}/substitution/single_heads.parquet: each measured head replaced alone: its perplexity, the KL to
# the unmodified model (nats per token) and the attribution order's estimate of that KL (on val; NaN without it).
SINGLE_HEADS = Table("single_heads", (("layer", "int32"), ("head", "int32"), ("ppl", "float64"),
                                      ("rel_increase", "float64"), ("kl", "float64"), ("estimated_kl", "float64")))

# results/{model}/substitution/tuned/heads.parquet: each head whose program the `tuned` method tuned, per fraction:
# the library program it started from, the tuned program's file (tuned/f{fraction}/L{layer}H{head}.py), and the
# mean test IoU (against the model's own attention) of both.
TUNED = Table("tuned", (("fraction", "float64"), ("layer", "int32"), ("head", "int32"), ("program", "string"),
                        ("file", "string"), ("test_iou_untuned", "float64"), ("test_iou_tuned", "float64")))

# results/{model}/substitution/orders.parquet: each order of the sweep (method; seed for random orders), heads in
# replacement order (`rank` 0 first). `headline`: the method chosen on val, whose order the QA runs replace in.
ORDERS = Table("orders", (("method", "string"), ("seed", "int64"), ("rank", "int32"), ("layer", "int32"),
                          ("head", "int32"), ("headline", "bool")))

# ---------------------------------------------------------------------------------------------------------
# Arrays for the per-head jobs and what they leave behind (.npz: numpy alone reads them, fast)

def _write_npz(path, arrays: dict) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


@dataclass
class SplitExamples:
    """The examples of one split, in example_id order: what a per-head job runs programs on."""
    example_ids: list[int]
    tokens: list[list[str]]
    texts: list[str]

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def calls(self) -> list[tuple[list[str], str]]:
        """(tokens, text) pairs, as the program runner takes them."""
        return list(zip(self.tokens, self.texts))


class HeadInputs:
    """results/{model}/synthesis/head_inputs.npz: the examples of every split and every head's attention on
    them (packed lower triangles, concatenated), so a per-head job reads one file and imports only numpy.

    Keys: `example_ids_{split}`, `lengths_{split}`, `tokens_{split}` and `texts_{split}` (JSON), and
    `{head.name}_{split}` per head; with value Grams recorded (synthesis.offline.objective: output) also
    `gram_{head.name}_{split}`, in the same layout."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ContractError(f"head inputs: missing file {path}")
        self._npz = None

    def _arrays(self):
        """The file, opened on first use and kept open: each opening reads the zip's directory of every head's
        arrays (about 10 ms for a 270-head model), and the library reads two arrays per head and split."""
        if self._npz is None:
            self._npz = np.load(self.path)
        return self._npz

    @staticmethod
    def write(path, examples: dict[str, SplitExamples], attention: dict[tuple[HeadId, str], np.ndarray],
              grams: dict[tuple[HeadId, str], np.ndarray] | None = None) -> None:
        """examples: {split: SplitExamples}; attention (and grams, if recorded): {(head, split): packed
        triangles concatenated}."""
        arrays = {}
        for split, part in examples.items():
            arrays[f"example_ids_{split}"] = np.asarray(part.example_ids, dtype=np.int64)
            arrays[f"lengths_{split}"] = np.asarray(part.lengths, dtype=np.int64)
            arrays[f"tokens_{split}"] = np.array(json.dumps(part.tokens))
            arrays[f"texts_{split}"] = np.array(json.dumps(part.texts))
        for (head, split), flat in attention.items():
            expected = sum(n * (n + 1) // 2 for n in examples[split].lengths)
            if len(flat) != expected:
                raise ContractError(f"head inputs: {head} on {split} has {len(flat)} values, expected {expected}")
            arrays[f"{head.name}_{split}"] = np.asarray(flat, dtype=np.float32)
        for (head, split), flat in (grams or {}).items():
            if (head, split) not in attention or len(flat) != len(attention[head, split]):
                raise ContractError(f"head inputs: value Grams of {head} on {split} do not match its attention")
            arrays[f"gram_{head.name}_{split}"] = np.asarray(flat, dtype=np.float32)
        _write_npz(path, arrays)

    def examples(self, split: str) -> SplitExamples:
        z = self._arrays()
        if f"example_ids_{split}" not in z.files:
            raise ContractError(f"head inputs: {self.path} has no split '{split}'")
        return SplitExamples([int(e) for e in z[f"example_ids_{split}"]], json.loads(str(z[f"tokens_{split}"])),
                             json.loads(str(z[f"texts_{split}"])))

    def attention(self, head: HeadId, split: str) -> np.ndarray:
        """One head's packed attention on one split (triangles concatenated in example order)."""
        z = self._arrays()
        key = f"{head.name}_{split}"
        if key not in z.files:
            raise ContractError(f"head inputs: {self.path} has no attention for {head} on split '{split}'")
        return z[key]

    @property
    def has_value_grams(self) -> bool:
        """Whether extraction recorded the heads' value Grams (synthesis.offline.objective: output)."""
        z = self._arrays()
        return any(key.startswith("gram_") for key in z.files)

    def value_grams(self, head: HeadId, split: str) -> np.ndarray:
        """One head's packed value Grams on one split, in the attention's layout (`matrices.unpack_symmetric`
        gives each example's n x n matrix)."""
        z = self._arrays()
        key = f"gram_{head.name}_{split}"
        if key not in z.files:
            raise ContractError(f"head inputs: {self.path} has no value Grams for {head} on split '{split}' "
                                "(they are recorded with synthesis.offline.objective: output)")
        return z[key]


@dataclass
class ProgramScore:
    """One row of a head's rerank result: a candidate program scored on that head on every split. A
    candidate that failed (in synthesis or when run) scores worst: IoU 0, JS distance 1."""
    layer: int
    head: int
    name: str                      # the program: file stem, or "<stem>.<function>" in a reference-style file
    file: str | None               # relative to the head's synthesis folder
    origin: Origin
    status: CandidateStatus
    error: str | None = None
    causal: bool = False           # passed the causality check (row i reads tokens 0..i only)
    n_terms: int | None = None
    source_chars: int = 0
    synth_iou: float = 0.0
    val_iou: float = 0.0
    test_iou: float = 0.0
    synth_jsd: float = 1.0
    val_jsd: float = 1.0
    test_jsd: float = 1.0
    # relative output error ||(P - A) U|| / ||(uniform - A) U|| (scoring.output_error_table), where extraction
    # recorded value Grams (synthesis.offline.objective: output); None otherwise and for failed candidates
    synth_output_error: float | None = None
    val_output_error: float | None = None
    test_output_error: float | None = None

    def __post_init__(self):
        if self.status not in CANDIDATE_STATUSES:
            raise ContractError(f"program {self.name}: status {self.status!r} is not one of {CANDIDATE_STATUSES}")


class RerankResult:
    """results/{model}/rerank/L{l}H{h}.npz: one head's candidates scored on that head (`scores`, one
    ProgramScore per program or failed candidate), and what each program that ran output on every split, so
    no later stage runs a program again. Outputs are packed lower triangles concatenated over the split's
    examples (float16: attention weights need no more), one row per program in `names`; a program that
    failed on an example has zeros there (it scores IoU 0) and `failed_{split}` marks it.

    Keys: `scores` (JSON), `names` (P,), per split `example_ids_{split}`, `lengths_{split}`, `outputs_{split}`
    (P, D) and `failed_{split}` (P, E)."""

    def __init__(self, scores: list[ProgramScore], names: list[str],
                 splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]):
        self.scores, self.names = scores, list(names)
        self.splits = splits   # split -> (example_ids (E,), lengths (E,), outputs (P, D), failed (P, E))
        for split, (ids, lengths, outputs, failed) in splits.items():
            width = int(sum(n * (n + 1) // 2 for n in lengths))
            if outputs.shape != (len(self.names), width) or failed.shape != (len(self.names), len(ids)):
                raise ContractError(f"rerank result: {split} arrays have shapes {outputs.shape} and {failed.shape},"
                                    f" expected ({len(self.names)}, {width}) and ({len(self.names)}, {len(ids)})")

    def write(self, path) -> None:
        arrays = {"scores": np.array(json.dumps([asdict(s) for s in self.scores])),
                  "names": np.array(self.names, dtype=str)}
        for split, (ids, lengths, outputs, failed) in self.splits.items():
            arrays[f"example_ids_{split}"] = np.asarray(ids, dtype=np.int64)
            arrays[f"lengths_{split}"] = np.asarray(lengths, dtype=np.int64)
            arrays[f"outputs_{split}"] = np.asarray(outputs, dtype=np.float16)
            arrays[f"failed_{split}"] = np.asarray(failed, dtype=bool)
        _write_npz(path, arrays)

    @classmethod
    def read(cls, path, splits=SPLITS) -> "RerankResult":
        if not Path(path).is_file():
            raise ContractError(f"rerank result: missing file {path}")
        with np.load(path) as z:
            try:
                scores = [_from_dict(ProgramScore, row, f"{path}: scores") for row in json.loads(str(z["scores"]))]
                names = [str(n) for n in z["names"]]
                parts = {s: (z[f"example_ids_{s}"], z[f"lengths_{s}"], z[f"outputs_{s}"], z[f"failed_{s}"])
                         for s in splits}
            except KeyError as e:
                raise ContractError(f"rerank result: {path} lacks {e}") from None
        return cls(scores, names, parts)

    def matrices(self, name: str, split: str) -> list[np.ndarray | None]:
        """One program's n x n float32 matrices on a split's examples (None where it failed)."""
        from .matrices import unpack_many

        ids, lengths, outputs, failed = self.splits[split]
        row = outputs[self.names.index(name)].astype(np.float32)
        matrices = unpack_many(row, lengths)
        return [None if bad else m for m, bad in zip(matrices, failed[self.names.index(name)])]
