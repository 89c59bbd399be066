"""The HTML report: a folder a person opens from disk (no network, no CDN) that stays fast with 700+ heads.

    results/report/index.html                     the models side by side, a link to each
    results/report/{model}/index.html             overview: IoU and category per head, baselines, perplexity, QA
    results/report/{model}/heads/L{l}H{h}.html    one small page per head: real vs program attention, source

Every page is one file that renders alone (Snakemake's --report embeds single files): plots are inline SVG,
the overview's layer x head maps are SVG whose cells link to the head pages, and a head page carries its own
attention maps as small PNG data URIs inside SVG (token labels stay text). With 700+ heads the overview stays
light because the attention maps live only on the head pages.
Every figure says which split it comes from: test, unless it says otherwise.
"""
from __future__ import annotations

import base64
import functools
import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.colors
import matplotlib.ticker
import numpy as np
import PIL.Image
import pandas as pd
import pyarrow.parquet as pq
from jinja2 import Environment, PackageLoader
from markupsafe import Markup
from matplotlib.figure import Figure
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from . import __version__
from .atomic import atomic_dir, write_text
from .extract import dense, layer_file
from .programs import load_programs
from .runner import run_programs
from .scoring import soft_iou

DEFAULTS = {"examples_per_head": 3, "alternatives_per_head": 5, "fraction": 0.25}
IOU_CMAP = "viridis"
ATTENTION_CMAP = "Blues"
FUTURE_GREY = (0.93, 0.93, 0.93, 1.0)
NO_PROGRAM_GREY = "#d5d8de"


class ReportError(ValueError):
    """A missing or malformed input, named in one line."""


# ---------------------------------------------------------------------------------------------------------
# Reading one model's results

@dataclass
class ModelResults:
    name: str
    root: Path                     # results/{model}
    info: dict                     # model/info.json
    summary: dict                  # library/summary.json
    heads: pd.DataFrame            # best.parquet joined with programs.parquet: one row per head
    programs: pd.DataFrame         # programs.parquet, indexed by name
    scores: pd.DataFrame           # scores.parquet
    baselines: pd.DataFrame        # baselines.parquet
    substitution: dict | None      # substitution/summary.json, when substitution ran
    sweep: pd.DataFrame | None     # substitution/sweep.parquet
    single: pd.DataFrame | None    # substitution/single_heads.parquet: each measured head replaced alone
    qa: dict | None                # qa/summary.json, when QA ran


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"report: missing input {path}") from None
    except json.JSONDecodeError as error:
        raise ReportError(f"report: {path} is not valid JSON ({error})") from None


def _read_parquet(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise ReportError(f"report: missing input {path}")
    frame = pd.read_parquet(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReportError(f"report: {path} lacks column(s) {', '.join(missing)}")
    return frame


def _read_optional_parquet(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


def main_split(sweep: pd.DataFrame, substitution: dict | None) -> str:
    """The evaluation set the substitution summary reports on (held-out text when there is some)."""
    splits = list(sweep["split"].unique())
    named = (substitution or {}).get("split")
    return named if named in splits else ("heldout" if "heldout" in splits else sorted(splits)[0])


def read_model_results(root: str | Path, name: str | None = None) -> ModelResults:
    """Everything the report shows about one model, from results/{model}/ (substitution and QA optional)."""
    root = Path(root)
    library = root / "library"
    programs = _read_parquet(library / "programs.parquet",
                             ["name", "origin", "source_layer", "source_head", "description", "category", "causal"])
    best = _read_parquet(library / "best.parquet",
                         ["layer", "head", "program", "val_iou", "test_iou", "synth_iou", "causal"])
    unknown = sorted(set(best["program"]) - set(programs["name"]))
    if unknown:
        raise ReportError(f"report: best.parquet names programs missing from programs.parquet: {unknown[:3]}")
    heads = best.merge(programs.drop(columns=["causal"]), left_on="program", right_on="name", how="left")
    heads = heads.drop(columns=["name"]).sort_values(["layer", "head"]).reset_index(drop=True)
    sub_dir, qa_dir = root / "substitution", root / "qa"
    return ModelResults(
        name=name or root.name,
        root=root,
        info=_read_json(root / "model" / "info.json"),
        summary=_read_json(library / "summary.json"),
        heads=heads,
        programs=programs.set_index("name", drop=False),
        scores=_read_parquet(library / "scores.parquet", ["program", "layer", "head", "split", "iou"]),
        baselines=_read_parquet(library / "baselines.parquet", ["baseline", "layer", "head", "split", "iou"]),
        substitution=_read_json(sub_dir / "summary.json") if (sub_dir / "summary.json").is_file() else None,
        sweep=_read_optional_parquet(sub_dir / "sweep.parquet"),
        single=_read_optional_parquet(sub_dir / "single_heads.parquet"),
        qa=_read_json(qa_dir / "summary.json") if (qa_dir / "summary.json").is_file() else None,
    )


# ---------------------------------------------------------------------------------------------------------
# Pictures: SVG built by hand where cells must be links or labels must stay text, matplotlib for plots

def _colour(cmap: str, value: float) -> str:
    return matplotlib.colors.to_hex(matplotlib.colormaps[cmap](float(np.clip(value, 0.0, 1.0))))


def category_colours(categories: list[str]) -> dict[str, str]:
    """A fixed colour per category, most frequent first: tab20's ten strong colours, then its ten light ones
    (then it repeats)."""
    palette = matplotlib.colormaps["tab20"].colors  # pairs: strong at even indices, light at odd
    ordered = pd.Series(categories).value_counts().index
    return {c: matplotlib.colors.to_hex(palette[(2 * i + i // 10) % 20]) for i, c in enumerate(ordered)}


def head_grid_svg(n_layers: int, n_heads: int, cells: dict[tuple[int, int], dict], cell_w: int = 26,
                  cell_h: int = 18) -> Markup:
    """A layer x head grid (rows = layers). Each cell dict has `fill`, `title` and optionally `href`, `text`."""
    left, top = 34, 18
    width, height = left + n_heads * cell_w + 2, top + n_layers * cell_h + 2
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="10">']
    for h in range(n_heads):
        parts.append(f'<text x="{left + (h + .5) * cell_w}" y="{top - 5}" text-anchor="middle">{h}</text>')
    for layer in range(n_layers):
        y = top + layer * cell_h
        parts.append(f'<text x="{left - 5}" y="{y + cell_h * .7}" text-anchor="end">L{layer}</text>')
        for h in range(n_heads):
            cell = cells.get((layer, h), {"fill": NO_PROGRAM_GREY, "title": f"L{layer}H{h}: no program"})
            x = left + h * cell_w
            rect = (f'<rect x="{x}" y="{y}" width="{cell_w - 1}" height="{cell_h - 1}" fill="{cell["fill"]}">'
                    f'<title>{html.escape(cell["title"])}</title></rect>')
            if cell.get("text"):
                ink = "#fff" if _is_dark(cell["fill"]) else "#000"
                rect += (f'<text x="{x + cell_w / 2 - .5}" y="{y + cell_h * .7}" text-anchor="middle" fill="{ink}" '
                         f'pointer-events="none">{html.escape(cell["text"])}</text>')
            parts.append(f'<a href="{html.escape(cell["href"])}">{rect}</a>' if cell.get("href") else rect)
    parts.append("</svg>")
    return Markup("".join(parts))


def _is_dark(hex_colour: str) -> bool:
    r, g, b = matplotlib.colors.to_rgb(hex_colour)
    return 0.299 * r + 0.587 * g + 0.114 * b < 0.5


def iou_scale_legend() -> Markup:
    """Swatches for the IoU colour scale."""
    return Markup("".join(f'<span><span class="swatch" style="background:{_colour(IOU_CMAP, v)}"></span>{v:.1f}</span>'
                          for v in np.linspace(0, 1, 6)))


def _attention_palette() -> list[int]:
    """256 PNG palette entries: 0..254 the attention colour scale, 255 the grey of the unseen future."""
    colours = matplotlib.colormaps[ATTENTION_CMAP](np.linspace(0, 1, 255))[:, :3]
    return (np.rint(np.vstack([colours, FUTURE_GREY[:3]]) * 255).astype(np.uint8)).ravel().tolist()


ATTENTION_PALETTE = _attention_palette()


def attention_png(matrix: np.ndarray, causal: bool) -> str:
    """A data URI of an n x n palette PNG, one pixel per entry: colour = sqrt(weight), the unseen future grey."""
    levels = np.rint(np.sqrt(np.clip(matrix, 0.0, 1.0)) * 254).astype(np.uint8)
    if causal:
        levels[np.triu_indices(matrix.shape[0], k=1)] = 255
    image = PIL.Image.fromarray(levels)
    image.putpalette(ATTENTION_PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def token_label(token: str, width: int = 12) -> str:
    """A token as an axis label: whitespace made visible, long tokens cut."""
    label = token.replace("\n", "⏎").replace("\t", "⇥").strip() or "␣"
    return label if len(label) <= width else label[: width - 1] + "…"


@functools.lru_cache(maxsize=64)
def _token_axes(tokens: tuple[str, ...]) -> tuple[int, int, int, str]:
    """Cell size, font size, margin, and the SVG text of both axes' token labels (the same for every head)."""
    n = len(tokens)
    cell = int(np.clip(440 // max(n, 1), 5, 18))
    font = min(cell - 1, 11)
    labels = [token_label(t) for t in tokens]
    margin = int(max(map(len, labels), default=0) * font * 0.62) + 6
    parts = []
    for i, label in enumerate(map(html.escape, labels)):
        centre = margin + (i + .5) * cell
        parts.append(f'<text x="{margin - 3}" y="{centre}" text-anchor="end" dominant-baseline="central">{label}</text>'
                     f'<text transform="translate({centre},{margin - 3}) rotate(-90)" '
                     f'dominant-baseline="central">{label}</text>')
    return cell, font, margin, "".join(parts)


def attention_svg(matrix: np.ndarray, tokens: list[str], causal: bool) -> Markup:
    """An attention map with its tokens written along both axes (rows attend, columns are attended to)."""
    cell, font, margin, labels = _token_axes(tuple(tokens))
    size = len(tokens) * cell
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{margin + size + 2}" height="{margin + size + 2}" '
        f'font-family="sans-serif" font-size="{font}">'
        f'<image x="{margin}" y="{margin}" width="{size}" height="{size}" preserveAspectRatio="none" '
        f'style="image-rendering:pixelated" href="{attention_png(matrix, causal)}"/>'
        f'<rect x="{margin}" y="{margin}" width="{size}" height="{size}" fill="none" stroke="#999"/>'
        f'{labels}</svg>')


def _svg_of(figure: Figure) -> str:
    """A matplotlib figure as SVG text with real <text> (small, and searchable)."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "attnprog"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buffer.getvalue()


def _inline(svg: str) -> Markup:
    """SVG text ready to sit inside HTML (without its XML prologue and matplotlib's RDF metadata)."""
    return Markup(re.sub(r"<metadata>.*?</metadata>", "", svg[svg.index("<svg"):], flags=re.S))


def layer_iou_figure(heads: pd.DataFrame, baselines: pd.DataFrame) -> str:
    """Mean test IoU per layer: the best programs against each baseline (the paper's Figure 2)."""
    figure = Figure(figsize=(6.2, 3.8))
    ax = figure.add_subplot()
    per_layer = heads.groupby("layer")["test_iou"].mean()
    ax.plot(per_layer.index, per_layer.values, "o-", lw=2.2, color="#2c5fa8", label="best program", zorder=3)
    test = baselines[baselines["split"] == "test"]
    for i, (name, rows) in enumerate(test.groupby("baseline")):
        means = rows.groupby("layer")["iou"].mean()
        ax.plot(means.index, means.values, ".--", lw=1.2, color=f"C{i + 1}", label=name)
    ax.set(xlabel="layer", ylabel="mean test IoU", ylim=(0, 1))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=.3)
    ax.legend(fontsize=8, loc="best")
    return _svg_of(figure)


METHODS = {"programs": ("programs, best val IoU first", "#2c5fa8"),
           "random": ("programs, random order", "#2ca02c"),
           "uniform": ("uniform matrix, same heads", "#d62728")}


def _method_style(method: str, i: int) -> tuple[str, str]:
    return METHODS.get(method, (method, f"C{i + 3}"))


def _plain_log_labels(axis) -> None:
    """Label a log axis 10, 20, 50, 100 rather than 10^1, 2x10^1 (minor ticks: only 2s and 5s)."""
    def label(value, _):
        leading = round(value / 10 ** np.floor(np.log10(value))) if value > 0 else 0
        return f"{value:g}" if leading in (1, 2, 5) else ""
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(label))
    axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(label))


def _legend_above(figure: Figure) -> None:
    """One legend for every panel, above them, so it never hides a curve."""
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(labels), 3),
                  fontsize=8, frameon=False)


def sweep_curves(sweep: pd.DataFrame) -> dict[tuple[str, str], pd.DataFrame]:
    """{(eval split, method): perplexity per fraction with its 95% interval}. Runs of several seeds (random
    order) are averaged, and their band spans every seed's interval."""
    curves = {}
    for (split, method), rows in sweep.groupby(["split", "method"]):
        curves[split, method] = rows.groupby("fraction").agg(
            ppl=("ppl", "mean"), lo=("ppl_lo", "min"), hi=("ppl_hi", "max"), seeds=("ppl", "size"),
            n_replaced=("n_replaced", "max"))
    return curves


def perplexity_figure(sweep: pd.DataFrame, first_split: str) -> tuple[str, str]:
    """Perplexity against the fraction of heads replaced, every method with its interval; one panel per
    evaluation set, `first_split` first. Returns (svg, note)."""
    curves = sweep_curves(sweep)
    splits = sorted(sweep["split"].unique(), key=lambda split: (split != first_split, split))
    figure = Figure(figsize=(4.6 * len(splits) + 1.4, 3.8))
    for k, split in enumerate(splits):
        ax = figure.add_subplot(1, len(splits), k + 1)
        for i, method in enumerate(sorted(sweep["method"].unique(), key=lambda m: (m not in METHODS, m))):
            if (split, method) not in curves:
                continue
            curve, (label, colour) = curves[split, method], _method_style(method, i)
            seeds = int(curve["seeds"].max())
            ax.plot(curve.index, curve["ppl"], "o-", ms=3.5, color=colour,
                    label=label + (f" (mean of {seeds} seeds)" if seeds > 1 else ""))
            ax.fill_between(curve.index, curve["lo"], curve["hi"], color=colour, alpha=.18, lw=0)
        tokens = int(sweep.loc[sweep["split"] == split, "n_tokens"].max())
        ax.set(yscale="log", xlabel="fraction of heads replaced", ylabel="perplexity",
               title=f"{split} ({tokens:,} tokens)")
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        _plain_log_labels(ax.yaxis)
        ax.grid(alpha=.3, which="both")
    figure.tight_layout()
    _legend_above(figure)
    note = ("Bands: 95% bootstrap intervals over the evaluation sequences. Heads are replaced in order of their "
            "best program's val IoU; the uniform baseline replaces the same heads with uniform causal attention.")
    return _svg_of(figure), note


def single_head_figure(single: pd.DataFrame, heads: pd.DataFrame, substitution: dict | None) -> tuple[str, str]:
    """Each measured head's test IoU against the perplexity cost of replacing it alone. Returns (svg, note)."""
    merged = single.merge(heads[["layer", "head", "test_iou"]], on=["layer", "head"])
    figure = Figure(figsize=(5.2, 3.6))
    ax = figure.add_subplot()
    ax.scatter(merged["test_iou"], 100 * merged["rel_increase"], s=14, color="#2c5fa8", alpha=.7)
    ax.axhline(0, color="#999", lw=.8)
    ax.set(xlabel="test IoU of the head's best program", ylabel="perplexity increase (%)", xlim=(0, 1),
           title="One head replaced at a time")
    ax.grid(alpha=.3)
    stats = (substitution or {}).get("single_head") or {}
    note = f"{len(merged)} heads spread over the IoU ranking, each replaced alone by its program."
    if "spearman_rho" in stats:
        note += f" Spearman correlation of IoU and cost: {stats['spearman_rho']:.2f} (p = {stats['p_value']:.2g})."
    return _svg_of(figure), note


QA_COLUMNS = ["task", "metric", "method", "fraction", "n_questions", "acc", "lo", "hi", "diff", "diff_lo", "diff_hi",
              "n_changed", "mcnemar_p"]


def qa_table(qa: dict) -> pd.DataFrame:
    """QA results from qa/summary.json as rows of task, metric, method, fraction, n_questions, acc with lo / hi
    (±1.96 lm-eval standard errors), and the paired comparison with the unmodified model on the same questions:
    diff (accuracy difference) with diff_lo / diff_hi (its paired 95% interval), n_changed, mcnemar_p (NaN
    in summaries written before QA was paired). Per task the metric is the one summary.json names for it, else
    acc_norm (length-normalised log-likelihood, the paper's scoring) when every row has it, else acc."""
    rows = pd.DataFrame(qa.get("results", []))
    if rows.empty:
        return pd.DataFrame(columns=QA_COLUMNS)
    parts = []
    for task, group in rows.groupby("task", sort=True):
        metric = qa.get("metrics", {}).get(task) or \
            ("acc_norm" if "acc_norm" in group and group["acc_norm"].notna().all() else "acc")
        if metric not in group:
            continue
        acc = group[metric].astype(float)

        def column(name):
            return pd.to_numeric(group.get(name, pd.Series(np.nan, index=group.index)), errors="coerce")

        stderr = column(f"{metric}_stderr")
        parts.append(pd.DataFrame({"task": task, "metric": metric, "method": group["method"],
                                   "fraction": group["fraction"].astype(float), "n_questions": column("n_questions"),
                                   "acc": acc, "lo": acc - 1.96 * stderr, "hi": acc + 1.96 * stderr,
                                   **{name: column(name) for name in QA_COLUMNS[8:]}}))
    return pd.concat(parts, ignore_index=True)[QA_COLUMNS] if parts else pd.DataFrame(columns=QA_COLUMNS)


def qa_figure(qa: dict) -> tuple[str, str]:
    """One small panel per task: the accuracy difference from the unmodified model on the same questions,
    with its paired 95% interval, against the fraction of heads replaced, per method (McNemar's p beside each
    point). Summaries without the paired comparison get accuracy with lm-eval's bands. Returns (svg, note)."""
    table = qa_table(qa)
    if not len(table):
        return "", ""
    paired = table["diff"].notna().any()
    value, low, high = ("diff", "diff_lo", "diff_hi") if paired else ("acc", "lo", "hi")
    tasks = sorted(table["task"].unique())
    columns = min(len(tasks), 3)
    lines = -(-len(tasks) // columns)
    figure = Figure(figsize=(3.6 * columns + 1.2, 2.9 * lines))
    for k, task in enumerate(tasks):
        ax = figure.add_subplot(lines, columns, k + 1)
        rows = table[table["task"] == task]
        methods = sorted(rows.groupby("method"), key=lambda g: (g[0] not in METHODS, g[0]))
        for i, (method, group) in enumerate(methods):
            curve = group.groupby("fraction")[[value, low, high, "mcnemar_p"]].mean()
            label, colour = _method_style(method, i)
            if not paired:
                ax.plot(curve.index, curve[value], "o-", ms=3, color=colour, label=label)
                ax.fill_between(curve.index, curve[low], curve[high], color=colour, alpha=.15, lw=0)
                continue
            x = curve.index + 0.008 * (i - (len(methods) - 1) / 2)  # methods side by side at each fraction
            ax.errorbar(x, 100 * curve[value], yerr=100 * np.abs(curve[[low, high]].to_numpy().T - curve[value].to_numpy()),
                        fmt="o-", ms=3, capsize=2, color=colour, label=label)
            for fx, fy, p in zip(x, 100 * curve[value], curve["mcnemar_p"]):
                if fx > 0.01 and np.isfinite(p):
                    ax.annotate(f"p={p:.2g}", (fx, fy), textcoords="offset points", xytext=(4, 3), fontsize=6,
                                color=colour)
        metric, n = rows["metric"].iloc[0], rows["n_questions"].max()
        title = f"{task} ({metric}" + (f", {n:.0f} questions)" if np.isfinite(n) else ")")
        if paired:
            base = rows.loc[rows["fraction"] == 0, "acc"]
            title += f"\nunmodified: {base.iloc[0]:.3f}" if len(base) else ""
            ax.axhline(0, color="grey", lw=.8)
            ax.set(ylabel="accuracy change (points)")
        else:
            ax.set(ylim=(0, 1), ylabel=metric)
        ax.set(title=title, xlabel="heads replaced")
        ax.title.set_fontsize(9)
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.grid(alpha=.3)
    figure.tight_layout()
    _legend_above(figure)
    if paired:
        note = ("Accuracy minus the unmodified model's, on the same questions, in percentage points; acc_norm "
                "(length-normalised log-likelihood, the paper's scoring) where the task reports it, else acc. Bars: "
                "95% interval of the paired difference (normal approximation over questions); p: McNemar's exact "
                "test on the questions whose correctness changed.")
    else:
        note = ("Accuracy as lm-eval scores it: acc_norm (length-normalised log-likelihood) where the task reports "
                "it, else acc. Bands: ±1.96 standard errors (lm-eval's stderr).")
    return _svg_of(figure), note


def qa_cell(qa: dict | None, fraction: float) -> str:
    """Mean accuracy over tasks with no head replaced -> at the fraction nearest `fraction` (programs), with the
    mean paired difference and the answers changed where the summary has them."""
    table = qa_table(qa) if qa else pd.DataFrame()
    table = table[table["method"] == "programs"] if len(table) else table
    if not len(table):
        return "–"
    fractions = np.array(sorted(table["fraction"].unique()))
    at = fractions[np.abs(fractions - fraction).argmin()]
    means = table.groupby("fraction")["acc"].mean()
    cell = f"{means[fractions[0]]:.3f} → {means[at]:.3f}" + ("" if np.isclose(at, fraction) else f" at {at:.0%}")
    changed = table.loc[table["fraction"] == at, "n_changed"]
    if at > 0 and changed.notna().all():
        questions = table.loc[table["fraction"] == at, "n_questions"].sum()
        cell += f" ({changed.sum():.0f} of {questions:.0f} answers changed)"
    return cell


# ---------------------------------------------------------------------------------------------------------
# Pages

def _environment() -> Environment:
    env = Environment(loader=PackageLoader("attnprog", "report_templates"), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    css = (Path(__file__).parent / "report_templates" / "style.css").read_text()
    css += HtmlFormatter(style="friendly").get_style_defs(".hl")
    env.globals.update(css=Markup(css), version=__version__)
    return env


def head_href(layer: int, head: int) -> str:
    return f"heads/L{layer}H{head}.html"


def choose_examples(examples: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k shortest test examples (ties by id): short ones give readable token-labelled maps."""
    test = examples[examples["split"] == "test"].copy()
    test["n"] = test["tokens"].map(len)
    return test.sort_values(["n", "example_id"]).head(k).reset_index(drop=True)


def real_attention(results: ModelResults, example_ids: list[int]) -> dict[tuple[int, int, int], np.ndarray]:
    """{(layer, head, example_id): matrix} for the chosen examples only, one layer file read at a time."""
    out = {}
    for layer in range(int(results.info["n_layers"])):
        path = layer_file(results.root / "attention", layer)
        if not path.is_file():
            raise ReportError(f"report: missing input {path}")
        table = pq.read_table(path, filters=[("example_id", "in", list(example_ids))])
        for example_id, head, n, flat in zip(table["example_id"].to_pylist(), table["head"].to_pylist(),
                                             table["n"].to_pylist(), table["attention"].to_numpy()):
            out[layer, head, example_id] = dense(np.asarray(flat, dtype=np.float32), n)
    return out


def program_file(results: ModelResults, name: str) -> Path:
    """A library program's file: programs/{name}.py, or programs/{stem}.py for a reference-signature
    program named "{stem}.{function}"."""
    folder = results.root / "library" / "programs"
    path = folder / f"{name}.py"
    return path if path.is_file() else folder / f"{name.rsplit('.', 1)[0]}.py"


def program_attention(results: ModelResults, names: list[str], examples: list[tuple[list[str], str]]
                      ) -> dict[str, list[np.ndarray | None]]:
    """{program: [matrix or None (the program failed) per example]}, run the way the library scored them:
    untrusted programs in the sandbox, programs that failed the causality check prefix by prefix."""
    load_path = Path(str(results.info.get("load_path", "")))
    tokenizer_dir = load_path if load_path.is_dir() else None
    causal_model = bool(results.info.get("is_causal", True))
    groups: dict[bool, list] = {False: [], True: []}  # prefixwise? -> programs
    for name in names:
        row = results.programs.loc[name]
        path = program_file(results, name)
        found = [p for p in load_programs(path, trusted=bool(row.get("trusted", False))) if p.name == name]
        if not found:
            raise ReportError(f"report: program {name} not found in {path}")
        groups[causal_model and not bool(row["causal"])] += found
    out = {}
    for prefixwise, chosen in groups.items():
        if chosen:
            runs = run_programs(chosen, examples, tokenizer_dir=tokenizer_dir, causal=causal_model,
                                prefixwise=prefixwise)
            out.update({name: run.matrices for name, run in runs.items()})
    return out


HTML_FORMATTER = HtmlFormatter(cssclass="hl")


def highlighted_source(path: Path) -> Markup:
    if not path.is_file():
        return Markup(f'<p class="muted">Source file missing: <code>{html.escape(str(path))}</code></p>')
    return Markup(highlight(path.read_text(), PythonLexer(), HTML_FORMATTER))


def alternatives_by_head(results: ModelResults, k: int) -> dict[tuple[int, int], list[dict]]:
    """Per head, the k programs after its best one by val IoU, with their test IoU (one pass over scores)."""
    if k <= 0:
        return {}
    table = results.scores.pivot_table(index=["layer", "head", "program"], columns="split", values="iou")
    if "val" not in table:
        return {}
    table = table.reset_index().merge(results.heads[["layer", "head", "program"]], how="left",
                                      on=["layer", "head", "program"], indicator=True)
    table = table[table["_merge"] == "left_only"]  # drop each head's best program
    table = table.sort_values("val", ascending=False).groupby(["layer", "head"]).head(k)
    descriptions = results.programs["description"]
    out: dict[tuple[int, int], list[dict]] = {}
    for row in table.itertuples():
        out.setdefault((row.layer, row.head), []).append(
            {"program": row.program, "val_iou": row.val, "test_iou": getattr(row, "test", np.nan),
             "description": descriptions.get(row.program, "")})
    return out


def baselines_by_head(results: ModelResults) -> dict[tuple[int, int], list[dict]]:
    """Per head, each baseline's test IoU, best first."""
    test = results.baselines[results.baselines["split"] == "test"].sort_values("iou", ascending=False)
    out: dict[tuple[int, int], list[dict]] = {}
    for row in test.itertuples():
        out.setdefault((row.layer, row.head), []).append({"name": row.baseline, "iou": row.iou})
    return out


def head_examples(layer: int, head: int, program: str, examples: pd.DataFrame, real: dict, predicted: dict,
                  program_maps: dict, causal: bool) -> list[dict]:
    """The head's real attention beside its program's on each chosen example, with the IoU of the two."""
    shown = []
    for j, ex in examples.iterrows():
        actual = real.get((layer, head, int(ex["example_id"])))
        if actual is None:
            raise ReportError(f"report: no attention for L{layer}H{head} example {ex['example_id']}")
        mine = predicted[program][j]  # None: the program failed on this example
        shown.append({"example_id": int(ex["example_id"]), "n": int(ex["n"]), "text": ex["text"],
                      "real": attention_svg(actual, ex["tokens"], causal), "program": program_maps[program, j],
                      "iou": None if mine is None else soft_iou(actual, mine)})
    return shown


def render_head_pages(results: ModelResults, env: Environment, out_dir: Path, options: dict,
                      has_index: bool) -> int:
    """Write L{l}H{h}.html into `out_dir` for every head that has a best program; returns how many."""
    examples = choose_examples(pd.read_parquet(results.root / "data" / "examples.parquet"),
                               options["examples_per_head"])
    real = real_attention(results, examples["example_id"].tolist())
    causal = bool(results.info.get("is_causal", True))
    names = sorted(results.heads["program"].unique())
    calls = [(list(tokens), text) for tokens, text in zip(examples["tokens"], examples["text"])]
    predicted = program_attention(results, names, calls) if calls else {name: [] for name in names}
    program_maps = {(name, j): None if matrix is None else attention_svg(matrix, calls[j][0], causal)
                    for name, matrices in predicted.items() for j, matrix in enumerate(matrices)}
    sources = {name: highlighted_source(program_file(results, name)) for name in names}
    alternatives = alternatives_by_head(results, options["alternatives_per_head"])
    baselines = baselines_by_head(results)
    colours = category_colours(results.heads["category"].fillna("uncategorised").tolist())
    rows = results.heads.to_dict("records")
    pages = [f"L{h['layer']}H{h['head']}.html" for h in rows]
    heads_of = results.heads.groupby("program")[["layer", "head", "test_iou"]].apply(lambda g: g.to_dict("records"))
    template = env.get_template("head.html")
    for i, h in enumerate(rows):
        layer, head = int(h["layer"]), int(h["head"])
        h["category"] = h["category"] if isinstance(h["category"], str) else "uncategorised"
        h["colour"] = colours[h["category"]]
        also = [{**o, "href": f"L{o['layer']}H{o['head']}.html"} for o in heads_of[h["program"]]
                if (o["layer"], o["head"]) != (layer, head)]
        page = template.render(
            model=results.name, has_index=has_index, h=h, also=also, source=sources[h["program"]],
            examples=head_examples(layer, head, h["program"], examples, real, predicted, program_maps, causal),
            baselines=baselines.get((layer, head), []), alternatives=alternatives.get((layer, head), []),
            prev=pages[i - 1] if i > 0 else None, next=pages[i + 1] if i + 1 < len(rows) else None,
            examples_note=f"The {len(examples)} shortest test examples; every head shows the same ones.")
        (out_dir / pages[i]).write_text(page)
    return len(rows)


def overview_cards(results: ModelResults) -> list[dict]:
    s = results.summary
    total = int(results.info["n_layers"]) * int(results.info["n_heads"])
    cards = [{"value": f"{len(results.heads)}", "label": f"heads with a program (of {total})"},
             {"value": f"{s.get('library_size', len(results.programs))}", "label": "programs in the library"},
             {"value": f"{s.get('mean_test_iou', results.heads['test_iou'].mean()):.3f}", "label": "mean test IoU"},
             {"value": f"{s.get('mean_val_iou', results.heads['val_iou'].mean()):.3f}", "label": "mean val IoU"}]
    if s.get("baselines"):
        name, iou = max(s["baselines"].items(), key=lambda item: item[1])
        cards.append({"value": f"{iou:.3f}", "label": f"best baseline ({name})"})
    return cards


def method_rows(results: ModelResults) -> list[dict]:
    """Mean test IoU of the best programs and of each baseline, and on how many heads each baseline wins."""
    heads = results.heads.set_index(["layer", "head"])["test_iou"]
    rows = [{"name": "best program", "iou": heads.mean(), "wins": "–"}]
    test = results.baselines[results.baselines["split"] == "test"]
    for name, group in test.groupby("baseline"):
        values = group.set_index(["layer", "head"])["iou"]
        wins = int((values > heads.reindex(values.index)).sum())
        rows.append({"name": name, "iou": values.mean(), "wins": wins})
    return rows


def render_model_overview(results: ModelResults, env: Environment, has_index: bool) -> str:
    n_layers, n_heads = int(results.info["n_layers"]), int(results.info["n_heads"])
    heads = results.heads.copy()
    heads["category"] = heads["category"].where(heads["category"].map(lambda c: isinstance(c, str)),
                                                "uncategorised")
    colours = category_colours(heads["category"].tolist())
    show_text = n_heads <= 32
    iou_cells, category_cells = {}, {}
    for h in heads.itertuples():
        key, href = (int(h.layer), int(h.head)), head_href(h.layer, h.head)
        title = f"L{h.layer}H{h.head}: {h.program} — {h.description} (test IoU {h.test_iou:.3f})"
        iou_cells[key] = {"fill": _colour(IOU_CMAP, h.test_iou), "href": href, "title": title,
                          "text": f"{h.test_iou:.2f}".lstrip("0") if show_text else ""}
        category_cells[key] = {"fill": colours[h.category], "href": href, "title": f"{h.category} — {title}"}
    figures = {"layers": _inline(layer_iou_figure(heads, results.baselines)), "perplexity": None, "qa": None,
               "single": None}
    perplexity_note = qa_note = single_note = ""
    if results.sweep is not None and len(results.sweep):
        svg, perplexity_note = perplexity_figure(results.sweep, main_split(results.sweep, results.substitution))
        figures["perplexity"] = _inline(svg)
    if results.single is not None and len(results.single):
        svg, single_note = single_head_figure(results.single, heads, results.substitution)
        figures["single"] = _inline(svg)
    if results.qa:
        svg, qa_note = qa_figure(results.qa)
        figures["qa"] = _inline(svg) if svg else None
    counts = heads["category"].value_counts()
    page = env.get_template("model.html").render(
        m=results, cards=overview_cards(results), has_index=has_index,
        iou_grid=head_grid_svg(n_layers, n_heads, iou_cells), iou_scale=iou_scale_legend(),
        category_grid=head_grid_svg(n_layers, n_heads, category_cells),
        categories=[{"name": c, "colour": colours[c], "count": int(counts[c])} for c in counts.index],
        method_rows=method_rows(results), figures=figures, perplexity_note=perplexity_note, qa_note=qa_note,
        single_note=single_note,
        heads=[{**h, "href": head_href(h["layer"], h["head"])} for h in heads.to_dict("records")])
    return page


def write_model_report(results_dir: str | Path, out_dir: str | Path, options: dict | None = None,
                       name: str | None = None, has_index: bool = True) -> Path:
    """Write one model's overview `out_dir`/index.html and its head pages `out_dir`/heads/ (each atomically)."""
    options = {**DEFAULTS, **(options or {})}
    results = read_model_results(results_dir, name)
    env = _environment()
    overview = render_model_overview(results, env, has_index)
    with atomic_dir(Path(out_dir) / "heads") as tmp:
        render_head_pages(results, env, tmp, options, has_index)
        tmp.chmod(0o755)  # a temporary folder is private; the report is for reading
    write_text(Path(out_dir) / "index.html", overview)
    return Path(out_dir) / "index.html"


# ---------------------------------------------------------------------------------------------------------
# The cross-model index

def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else pattern.format(value)


def perplexity_cells(sweep: pd.DataFrame | None, substitution: dict | None, fraction: float) -> tuple[str, str]:
    """(perplexity with no head replaced, perplexity at the fraction nearest `fraction` with its relative
    increase and interval) for the programs method on the main evaluation set."""
    if sweep is None or not len(sweep):
        return "–", "–"
    rows = sweep[(sweep["method"] == "programs") & (sweep["split"] == main_split(sweep, substitution))]
    if not len(rows):
        return "–", "–"
    base = rows.loc[rows["fraction"].idxmin()]
    at = rows.loc[(rows["fraction"] - fraction).abs().idxmin()]
    return (f"{base['ppl']:.2f}",
            f"{at['ppl']:.2f} ({at['rel_increase']:+.1%} [{at['rel_lo']:+.1%}, {at['rel_hi']:+.1%}])"
            + (f" at {at['fraction']:.0%}" if not np.isclose(at["fraction"], fraction) else ""))


def model_row(results_dir: Path, name: str, fraction: float) -> dict:
    """One line of the cross-model table, from the small summary files only."""
    info = _read_json(results_dir / "model" / "info.json")
    summary = _read_json(results_dir / "library" / "summary.json")
    sweep = _read_optional_parquet(results_dir / "substitution" / "sweep.parquet")
    substitution_path = results_dir / "substitution" / "summary.json"
    substitution = _read_json(substitution_path) if substitution_path.is_file() else None
    ppl_base, ppl_at = perplexity_cells(sweep, substitution, fraction)
    baselines = summary.get("baselines") or {}
    best = max(baselines.items(), key=lambda item: item[1]) if baselines else None
    qa_path = results_dir / "qa" / "summary.json"
    return {"name": name, "href": f"{name}/index.html", "architecture": info.get("architecture", "?"),
            "shape": f"{info['n_layers']} × {info['n_heads']}", "library_size": summary.get("library_size", "–"),
            "val_iou": _fmt(summary.get("mean_val_iou")), "test_iou": _fmt(summary.get("mean_test_iou")),
            "baseline": f"{best[0]} ({best[1]:.3f})" if best else "–", "ppl_base": ppl_base, "ppl_at": ppl_at,
            "qa": qa_cell(_read_json(qa_path) if qa_path.is_file() else None, fraction)}


def models_figure(models: dict[str, Path]) -> Markup:
    """Inline SVG: each model's distribution of best-program test IoU, and its perplexity increase against the
    fraction of heads replaced (programs, best first, with intervals)."""
    figure = Figure(figsize=(11, 3.8))
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for i, (name, root) in enumerate(models.items()):
        iou = np.sort(_read_parquet(root / "library" / "best.parquet", ["test_iou"])["test_iou"].to_numpy())
        share = 1 - np.arange(len(iou) + 1) / max(len(iou), 1)  # share of heads with IoU above each step
        left.step(np.r_[0, iou, 1], np.r_[share, 0], where="post", color=f"C{i}", label=name)
        sweep = _read_optional_parquet(root / "substitution" / "sweep.parquet")
        if sweep is not None and len(sweep):
            summary_path = root / "substitution" / "summary.json"
            split = main_split(sweep, _read_json(summary_path) if summary_path.is_file() else None)
            rows = sweep[(sweep["method"] == "programs") & (sweep["split"] == split)]
            rows = rows.sort_values("fraction")
            right.plot(rows["fraction"], 1 + rows["rel_increase"], "o-", ms=3, color=f"C{i}", label=name)
            right.fill_between(rows["fraction"], 1 + rows["rel_lo"], 1 + rows["rel_hi"], color=f"C{i}",
                               alpha=.15, lw=0)
    left.set(xlabel="test IoU of the best program", ylabel="fraction of heads at least this good", xlim=(0, 1),
             ylim=(0, 1), title="How many heads a program explains")
    right.set(xlabel="fraction of heads replaced", ylabel="perplexity ÷ unmodified perplexity",
              title="Cost of replacing heads by programs")
    right.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    if right.lines:  # a ratio on a log scale: +20% and x10 both stay readable
        right.set_yscale("log")
        _plain_log_labels(right.yaxis)
    else:
        right.text(.5, .5, "substitution not run", transform=right.transAxes, ha="center", color="#777")
    for ax in (left, right):
        ax.grid(alpha=.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return _inline(_svg_of(figure))


def write_index(models: dict[str, str | Path], out_path: str | Path, options: dict | None = None) -> Path:
    """Write the cross-model page: `models` maps each model's name to its results/{model} folder."""
    options = {**DEFAULTS, **(options or {})}
    fraction = float(options["fraction"])
    models = {name: Path(root) for name, root in models.items()}
    rows = [model_row(root, name, fraction) for name, root in models.items()]
    page = _environment().get_template("index.html").render(
        models=rows, fraction_label=f"{fraction:.0%}", figure=models_figure(models),
        note="Perplexity on the substitution summary's evaluation set (held-out text when there is some), programs "
             "replacing heads in order of val IoU, with the relative increase and its 95% bootstrap interval.")
    write_text(out_path, page)
    return Path(out_path)
