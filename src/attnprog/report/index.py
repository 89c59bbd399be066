"""The cross-model index: the models side by side, linking to each model's overview (the final target)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.ticker
import numpy as np
import pandas as pd
from markupsafe import Markup
from matplotlib.figure import Figure

from ..atomic import write_text
from ..contracts import BEST, SWEEP, LibrarySummary, ModelInfo, QASummary, SubstitutionSummary, TransferSummary
from ..settings import ReportSettings
from .data import _read, headline_method, main_split
from .figures import _inline, _plain_log_labels, _svg_of, qa_cell
from .pages import environment


@dataclass
class ModelSummary:
    """What the index shows of one model, read from the files the `report` rule names."""
    name: str
    info: ModelInfo
    library: LibrarySummary                    # library/summary.json
    best: pd.DataFrame                         # library/best.parquet
    sweep: pd.DataFrame | None = None          # substitution/sweep.parquet
    substitution: SubstitutionSummary | None = None  # substitution/summary.json
    qa: QASummary | None = None                # qa/summary.json

    @classmethod
    def read(cls, name: str, info, library, best, sweep=None, substitution=None, qa=None) -> "ModelSummary":
        return cls(name, _read(ModelInfo, info), _read(LibrarySummary, library), _read(BEST, best),
                   _read(SWEEP, sweep) if sweep else None,
                   _read(SubstitutionSummary, substitution) if substitution else None,
                   _read(QASummary, qa) if qa else None)


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else pattern.format(value)


def substitution_cells(sweep: pd.DataFrame | None, substitution: SubstitutionSummary | None,
                       fraction: float) -> tuple[str, str, str]:
    """(perplexity with no head replaced; perplexity at the fraction nearest `fraction` with its relative
    increase and interval; the KL to the unmodified model there with its interval) for the headline method on
    the main evaluation set."""
    if sweep is None or not len(sweep):
        return "–", "–", "–"
    rows = sweep[(sweep["method"] == headline_method(sweep, substitution))
                 & (sweep["split"] == main_split(sweep, substitution))]
    if not len(rows):
        return "–", "–", "–"
    base = rows.loc[rows["fraction"].idxmin()]
    at = rows.loc[(rows["fraction"] - fraction).abs().idxmin()]
    where = f" at {at['fraction']:.0%}" if not np.isclose(at["fraction"], fraction) else ""
    return (f"{base['ppl']:.2f}",
            f"{at['ppl']:.2f} ({at['rel_increase']:+.1%} [{at['rel_lo']:+.1%}, {at['rel_hi']:+.1%}])" + where,
            f"{at['kl']:.3f} [{at['kl_lo']:.3f}, {at['kl_hi']:.3f}]" + where)


def model_row(model: ModelSummary, fraction: float) -> dict:
    """One line of the cross-model table, from the small summary files only."""
    ppl_base, ppl_at, kl_at = substitution_cells(model.sweep, model.substitution, fraction)
    baselines = model.library.baselines
    best = max(baselines.items(), key=lambda item: item[1]) if baselines else None
    return {"name": model.name, "href": f"{model.name}/index.html", "architecture": model.info.architecture,
            "shape": f"{model.info.n_layers} × {model.info.n_heads}",
            "library_size": model.library.library_size,
            "val_iou": _fmt(model.library.mean_val_iou), "test_iou": _fmt(model.library.mean_test_iou),
            "baseline": f"{best[0]} ({best[1]:.3f})" if best else "–", "ppl_base": ppl_base, "ppl_at": ppl_at,
            "kl_at": kl_at, "qa": qa_cell(model.qa, fraction)}


def depth_profile(best: pd.DataFrame, n_layers: int) -> pd.DataFrame:
    """Mean best-program test IoU per layer, at relative depth layer / n_layers, so models of different
    depths share one axis: columns `layer`, `depth`, `test_iou`."""
    per_layer = best.groupby("layer", as_index=False)["test_iou"].mean().sort_values("layer")
    per_layer["depth"] = per_layer["layer"] / n_layers
    return per_layer[["layer", "depth", "test_iou"]].reset_index(drop=True)


def models_figure(models: list[ModelSummary]) -> Markup:
    """Inline SVG, one colour per model: the distribution of best-program test IoU, mean test IoU by relative
    depth, the library's size curve, and the perplexity increase against the fraction of heads replaced (the
    headline order, chosen on val, with intervals)."""
    figure = Figure(figsize=(11, 7.6))
    share_ax, depth_ax, curve_ax, cost_ax = (figure.add_subplot(2, 2, k) for k in range(1, 5))
    for i, model in enumerate(models):
        name, colour = model.name, f"C{i}"
        iou = np.sort(model.best["test_iou"].to_numpy())
        share = 1 - np.arange(len(iou) + 1) / max(len(iou), 1)  # share of heads with IoU above each step
        share_ax.step(np.r_[0, iou, 1], np.r_[share, 0], where="post", color=colour, label=name)
        depth = depth_profile(model.best, model.info.n_layers)
        depth_ax.plot(depth["depth"], depth["test_iou"], "o-", ms=3, color=colour, label=name)
        curve = model.library.library_curve
        if curve:
            curve_ax.plot([p["size"] for p in curve], [p["mean_test_iou"] for p in curve], "o-", ms=3, color=colour,
                          label=name)
            if model.library.library_size:
                curve_ax.plot([model.library.library_size], [model.library.mean_test_iou], "s", ms=6, color=colour)
        sweep = model.sweep
        if sweep is not None and len(sweep):
            split = main_split(sweep, model.substitution)
            rows = sweep[(sweep["method"] == headline_method(sweep, model.substitution)) & (sweep["split"] == split)]
            rows = rows.sort_values("fraction")
            cost_ax.plot(rows["fraction"], 1 + rows["rel_increase"], "o-", ms=3, color=colour, label=name)
            cost_ax.fill_between(rows["fraction"], 1 + rows["rel_lo"], 1 + rows["rel_hi"], color=colour,
                                 alpha=.15, lw=0)
    share_ax.set(xlabel="test IoU of the best program", ylabel="fraction of heads at least this good", xlim=(0, 1),
                 ylim=(0, 1), title="How many heads a program explains")
    depth_ax.set(xlabel="relative depth (layer / layers)", ylabel="mean test IoU", xlim=(0, 1), ylim=(0, 1),
                 title="Where in the model programs explain heads")
    curve_ax.set(xscale="log", xlabel="programs in the library", ylabel="mean test IoU over heads",
                 title="Library size (square: the library)")
    curve_ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    cost_ax.set(xlabel="fraction of heads replaced", ylabel="perplexity ÷ unmodified perplexity",
                title="Cost of replacing heads by programs")
    cost_ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    if cost_ax.lines:  # a ratio on a log scale: +20% and x10 both stay readable
        cost_ax.set_yscale("log")
        _plain_log_labels(cost_ax.yaxis)
    else:
        cost_ax.text(.5, .5, "substitution not run", transform=cost_ax.transAxes, ha="center", color="#777")
    for ax in (share_ax, depth_ax, curve_ax, cost_ax):
        ax.grid(alpha=.3)
        if ax.lines:
            ax.legend(fontsize=8)
    figure.tight_layout()
    return _inline(_svg_of(figure))


def transfer_rows(transfers: list[TransferSummary], top: int = 5) -> list[dict]:
    """One line per ordered pair (library model, target model) of `library.transfer` results, with the
    library's programs that are universal on the target (most heads within the margin first)."""
    rows = []
    for t in sorted(transfers, key=lambda t: (t.library_model, t.target_model)):
        universal = [p for p in t.programs if p.universal_heads][:top]
        rows.append({"source": t.library_model, "target": t.target_model, "n_heads": t.n_heads,
                     "transfer_iou": _fmt(t.mean_test_iou), "own_iou": _fmt(t.own_mean_test_iou),
                     "share": _fmt(t.mean_test_iou / t.own_mean_test_iou if t.own_mean_test_iou else None, "{:.0%}"),
                     "programs_used": t.programs_used, "n_programs": t.n_programs,
                     "universal_heads": t.universal_heads, "margin": t.universal_margin,
                     "universal": [f"{p.name} ({p.universal_heads} heads): {p.description}" for p in universal]})
    return rows


def write_index(models: list[ModelSummary], out_path: str | Path, settings: ReportSettings,
                transfers: list[TransferSummary] = ()) -> Path:
    """Write the cross-model page; `transfers`: the `transfer` rule's results, one per ordered model pair."""
    fraction = float(settings.fraction)
    rows = [model_row(model, fraction) for model in models]
    page = environment().get_template("index.html").render(
        models=rows, fraction_label=f"{fraction:.0%}", figure=models_figure(models),
        transfers=transfer_rows(list(transfers)),
        note="Perplexity on the substitution summary's evaluation set (held-out text when there is some), programs "
             "replacing heads in each model's headline order (the sweep's method chosen on val), with the relative "
             "increase and its 95% bootstrap interval, and the KL from the unmodified model's next-token "
             "distributions to the substituted model's, in nats per token: the stricter measure, since perplexity "
             "can stay level while the model predicts other tokens.")
    write_text(out_path, page)
    return Path(out_path)
