"""Each stage's settings as a frozen record, built once from the validated config.

Defaults live in one place, the config schema (workflow/schemas/config.schema.yaml): the validated config
holds every key, so `from_config(section)` takes a section of it and a missing key is an error, not a default
of the code's own. `defaults(**changes)` builds a record from the schema's defaults (tests, tools, benches).
The rules still pass plain dicts as `params` (Snakemake compares params to decide reruns); the script or the
package's entry point builds the record. Keys a record does not declare are left to their other readers (the
`qa` rule's section also names its tasks; `synthesis` also holds the LLM backends' settings).

This module imports nothing heavy: the per-head jobs build their records from it.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import ClassVar


@dataclass(frozen=True)
class Settings:
    """A config section as a record. SECTION: where the section sits in the config."""
    SECTION: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        for f in fields(self):  # lists from YAML/JSON as tuples: a frozen record holds no mutable value
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))

    @classmethod
    def from_config(cls, section: Mapping):
        """The record of a validated config section (every field's key must be there)."""
        where = ".".join(cls.SECTION)
        if not isinstance(section, Mapping):
            raise _error(f"config: {where}: expected a mapping, found {type(section).__name__}")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields(cls):
            if f.name not in section:
                raise _error(f"config: {where}.{f.name}: missing (the validated config always has it; "
                             "is the config validated against the schema?)")
            value = section[f.name]
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], Settings):
                value = hints[f.name].from_config(value)
            values[f.name] = value
        return cls(**values)

    @classmethod
    def defaults(cls, **changes):
        """The record as the schema's defaults fill the section in, with `changes` applied."""
        from .config import schema_defaults

        section = schema_defaults(cls.SECTION[0])
        for key in cls.SECTION[1:]:
            section = section[key]
        return dataclasses.replace(cls.from_config(section), **changes)


def _error(message: str) -> Exception:
    from .config import ConfigError  # imported only on error: config loads jsonschema and yaml

    return ConfigError(message)


@dataclass(frozen=True)
class OfflineSynthesisSettings(Settings):
    """`synthesis.offline`: the project's own synthesizer (schema: what each setting does)."""
    SECTION: ClassVar[tuple[str, ...]] = ("synthesis", "offline")
    sizes: tuple[int, ...]
    interact_after: int
    l2: float
    n_words: int
    polish: bool
    polish_steps: int
    objective: str                 # iou | output


@dataclass(frozen=True)
class LLMSampleSettings(Settings):
    """`synthesis.llm`: an LLM explainer beside the offline synthesizer, on a seeded sample of heads."""
    SECTION: ClassVar[tuple[str, ...]] = ("synthesis", "llm")
    backend: str | None            # claude | open_weights; None: off
    heads_per_layer: int
    layers: tuple[int, ...] | None  # None: every layer
    seed: int
    hybrid: bool
    hybrid_max_terms: int

    def sample(self, n_layers: int, n_heads: int) -> list:
        """The sampled heads (contracts.HeadId), in order: `heads_per_layer` of each sampled layer, drawn with
        the seed and the layer (so sampling another layer leaves this one's heads alone). None when off."""
        import numpy as np

        from .contracts import HeadId

        if self.backend is None:
            return []
        layers = range(n_layers) if self.layers is None else sorted(set(self.layers))
        missing = [layer for layer in layers if layer >= n_layers]
        if missing:
            raise _error(f"config: synthesis.llm.layers: the model has {n_layers} layers, no layer {missing[0]}")
        per_layer = min(self.heads_per_layer, n_heads)
        return [HeadId(layer, int(head)) for layer in layers
                for head in sorted(np.random.default_rng([self.seed, layer]).choice(n_heads, per_layer, replace=False))]


@dataclass(frozen=True)
class LibrarySettings(Settings):
    """`library`: deduplication, the JS distance's top k, the set cover's tolerance, the shorter-program margin."""
    SECTION: ClassVar[tuple[str, ...]] = ("library",)
    dedup_decimals: int
    jsd_top_k: int
    tolerance: float
    prefer_shorter: float
    choose_by: str                 # iou | output: the val measure the cover and each head's choice use
    output_tolerance: float        # the cover's tolerance and the shorter-program margin when choosing by
    output_prefer_shorter: float   # output error (in relative output error)

    @property
    def margins(self) -> tuple[float, float]:
        """The cover's tolerance and the shorter-program margin, in the units of the measure `choose_by` names."""
        if self.choose_by == "output":
            return self.output_tolerance, self.output_prefer_shorter
        return self.tolerance, self.prefer_shorter


@dataclass(frozen=True)
class TuningSettings(Settings):
    """`substitution.tuning`: the `tuned` method's training."""
    SECTION: ClassVar[tuple[str, ...]] = ("substitution", "tuning")
    epochs: int
    learning_rate: float
    l2: float
    train_tokens: int
    batch_size: int


@dataclass(frozen=True)
class SubstitutionSettings(Settings):
    """`substitution`: the perplexity sweep."""
    SECTION: ClassVar[tuple[str, ...]] = ("substitution",)
    fractions: tuple[float, ...]
    methods: tuple[str, ...]
    attribution_samples: int
    random_seeds: tuple[int, ...]
    heldout_tokens: int | None
    batch_size: int
    bootstrap: int
    single_head_count: int | None
    single_head_split: str
    noncausal: str                 # prefixwise | skip
    tuning: TuningSettings


@dataclass(frozen=True)
class QASettings(Settings):
    """What one `qa` job runs (`qa` without the task list, its folder and the data seed, which the rule
    leaves out of the job's params)."""
    SECTION: ClassVar[tuple[str, ...]] = ("qa",)
    fractions: tuple[float, ...]
    questions: int | None
    methods: tuple[str, ...]
    batch_size: int


@dataclass(frozen=True)
class ReportSettings(Settings):
    """`report`: what the pages show."""
    SECTION: ClassVar[tuple[str, ...]] = ("report",)
    examples_per_head: int
    alternatives_per_head: int
    fraction: float
