"""What the report reads about one model: the files its rule names, through their contracts.

The report runs no program and reads no raw attention file: real attention comes from the per-head bundle
(`contracts.HeadInputs`) and each program's matrices from the outputs its rerank job stored
(`contracts.RerankResult`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..contracts import (BASELINES, BEST, PROGRAMS, SCORES, SINGLE_HEADS, SWEEP, ContractError, HeadId, HeadInputs,
                         ExplainerComparison, LibrarySummary, ModelInfo, QASummary, RerankResult, SubstitutionSummary)
from ..matrices import split_packed, unpack


class ReportError(ValueError):
    """A missing or malformed input, named in one line."""


@dataclass
class ModelInputs:
    """The files the report reads about one model (the report rules name each of them)."""
    info: Path
    head_inputs: Path
    programs: Path                  # library/programs.parquet
    program_files: Path             # library/programs/ (the library's sources)
    scores: Path
    best: Path
    baselines: Path
    library: Path                   # library/summary.json
    rerank: dict[HeadId, Path] = field(default_factory=dict)   # rerank/L{l}H{h}.npz
    sweep: Path | None = None
    single: Path | None = None
    substitution: Path | None = None
    qa: Path | None = None
    explainers: Path | None = None  # library/explainers.json (synthesis.llm)


@dataclass
class ModelResults:
    name: str
    inputs: ModelInputs
    info: ModelInfo
    summary: LibrarySummary        # library/summary.json
    heads: pd.DataFrame            # best.parquet joined with programs.parquet: one row per head
    programs: pd.DataFrame         # programs.parquet, indexed by name
    scores: pd.DataFrame           # scores.parquet
    baselines: pd.DataFrame        # baselines.parquet
    substitution: SubstitutionSummary | None  # substitution/summary.json, when substitution ran
    sweep: pd.DataFrame | None     # substitution/sweep.parquet
    single: pd.DataFrame | None    # substitution/single_heads.parquet: each measured head replaced alone
    qa: QASummary | None           # qa/summary.json, when QA ran
    explainers: ExplainerComparison | None = None  # library/explainers.json, when an LLM ran beside the offline fit


def _read(contract, path):
    """A file read through its contract (a table or a JSON record), its problem as a ReportError."""
    try:
        return contract.read(path)
    except ContractError as error:
        raise ReportError(f"report: {error}") from None


def main_split(sweep: pd.DataFrame, substitution: SubstitutionSummary | None) -> str:
    """The evaluation set the substitution summary reports on (held-out text when there is some)."""
    splits = list(sweep["split"].unique())
    named = substitution.split if substitution else None
    return named if named in splits else ("heldout" if "heldout" in splits else sorted(splits)[0])


def headline_method(sweep: pd.DataFrame, substitution: SubstitutionSummary | None) -> str:
    """The sweep method the substitution summary chose on val (the programs' IoU order without a choice)."""
    named = substitution.best.method if substitution else None
    return named if named in set(sweep["method"]) else "programs"


def read_model_results(inputs: ModelInputs, name: str) -> ModelResults:
    """Everything the report shows about one model (substitution and QA optional)."""
    programs = _read(PROGRAMS, inputs.programs)
    best = _read(BEST, inputs.best)
    unknown = sorted(set(best["program"]) - set(programs["name"]))
    if unknown:
        raise ReportError(f"report: best.parquet names programs missing from programs.parquet: {unknown[:3]}")
    heads = best.merge(programs.drop(columns=["causal"]), left_on="program", right_on="name", how="left")
    heads = heads.drop(columns=["name"]).sort_values(["layer", "head"]).reset_index(drop=True)
    present = lambda path: path is not None and Path(path).is_file()  # noqa: E731
    return ModelResults(
        name=name, inputs=inputs, info=_read(ModelInfo, inputs.info), summary=_read(LibrarySummary, inputs.library),
        heads=heads, programs=programs.set_index("name", drop=False), scores=_read(SCORES, inputs.scores),
        baselines=_read(BASELINES, inputs.baselines),
        substitution=_read(SubstitutionSummary, inputs.substitution) if present(inputs.substitution) else None,
        sweep=_read(SWEEP, inputs.sweep) if present(inputs.sweep) else None,
        single=_read(SINGLE_HEADS, inputs.single) if present(inputs.single) else None,
        qa=_read(QASummary, inputs.qa) if present(inputs.qa) else None,
        explainers=_read(ExplainerComparison, inputs.explainers) if present(inputs.explainers) else None)


def choose_examples(inputs: ModelInputs, k: int) -> list[dict]:
    """The k shortest test examples (ties by id), with their position in the test split: short ones give
    readable token-labelled maps. Every head page shows the same ones."""
    test = HeadInputs(inputs.head_inputs).examples("test")
    order = sorted(range(len(test.example_ids)), key=lambda e: (test.lengths[e], test.example_ids[e]))[:k]
    return [{"position": e, "example_id": test.example_ids[e], "tokens": test.tokens[e], "text": test.texts[e],
             "n": test.lengths[e]} for e in order]


def real_attention(inputs: ModelInputs, heads: list[HeadId], examples: list[dict]) -> dict:
    """{(layer, head, example_id): n x n matrix} of the chosen test examples."""
    bundle = HeadInputs(inputs.head_inputs)
    lengths = bundle.examples("test").lengths
    out = {}
    for head in heads:
        parts = split_packed(bundle.attention(head, "test"), lengths)
        for ex in examples:
            out[head.layer, head.head, ex["example_id"]] = unpack(parts[ex["position"]], ex["n"])
    return out


def program_attention(results: ModelResults, names: list[str], examples: list[dict]) -> dict[str, list]:
    """{program: [matrix, or None where it failed, per chosen example]} from the outputs its rerank job stored."""
    out = {}
    by_head: dict[HeadId, list[str]] = {}
    for name in names:
        row = results.programs.loc[name]
        by_head.setdefault(HeadId(int(row["source_layer"]), int(row["source_head"])), []).append(name)
    for head, head_names in by_head.items():
        path = results.inputs.rerank.get(head)
        if path is None:
            raise ReportError(f"report: no rerank result given for {head}")
        stored = RerankResult.read(path, splits=("test",))
        for name in head_names:
            if name not in stored.names:
                raise ReportError(f"report: {path} holds no outputs of program {name}")
            matrices = stored.matrices(name, "test")
            out[name] = [matrices[ex["position"]] for ex in examples]
    return out


def head_ids(heads: pd.DataFrame) -> list[HeadId]:
    return [HeadId(int(layer), int(head)) for layer, head in zip(heads["layer"], heads["head"])]
