"""The report's pictures: SVG built by hand where cells must be links or labels must stay text (head grids,
token-labelled attention maps), matplotlib for plots. Every function returns SVG text or Markup."""
from __future__ import annotations

import base64
import functools
import html
import io
import re

import matplotlib
import matplotlib.colors
import matplotlib.ticker
import numpy as np
import PIL.Image
import pandas as pd
from markupsafe import Markup
from matplotlib.figure import Figure

from ..contracts import HeadId, QASummary, SubstitutionSummary

IOU_CMAP = "viridis"
ATTENTION_CMAP = "Blues"
FUTURE_GREY = (0.93, 0.93, 0.93, 1.0)
NO_PROGRAM_GREY = "#d5d8de"


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
            cell = cells.get((layer, h), {"fill": NO_PROGRAM_GREY, "title": f"{HeadId(layer, h)}: no program"})
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
           "attribution": ("programs, least estimated KL first", "#9467bd"),
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
    """{(eval split, method): perplexity and KL to the unmodified model per fraction, each with its 95%
    interval}. Runs of several seeds (random order) are averaged, and their band spans every seed's interval."""
    curves = {}
    for (split, method), rows in sweep.groupby(["split", "method"]):
        curves[split, method] = rows.groupby("fraction").agg(
            ppl=("ppl", "mean"), lo=("ppl_lo", "min"), hi=("ppl_hi", "max"), kl=("kl", "mean"),
            kl_lo=("kl_lo", "min"), kl_hi=("kl_hi", "max"), seeds=("ppl", "size"), n_replaced=("n_replaced", "max"))
    return curves


def perplexity_figure(sweep: pd.DataFrame, first_split: str) -> tuple[str, str]:
    """Perplexity (top row) and KL to the unmodified model (bottom row) against the fraction of heads replaced,
    every method with its interval; one column per evaluation set, `first_split` first. Returns (svg, note)."""
    curves = sweep_curves(sweep)
    splits = sorted(sweep["split"].unique(), key=lambda split: (split != first_split, split))
    methods = sorted(sweep["method"].unique(), key=lambda m: (m not in METHODS, m))
    figure = Figure(figsize=(4.6 * len(splits) + 1.4, 7.2))
    for k, split in enumerate(splits):
        ppl_ax = figure.add_subplot(2, len(splits), k + 1)
        kl_ax = figure.add_subplot(2, len(splits), len(splits) + k + 1, sharex=ppl_ax)
        for i, method in enumerate(methods):
            if (split, method) not in curves:
                continue
            curve, (label, colour) = curves[split, method], _method_style(method, i)
            seeds = int(curve["seeds"].max())
            ppl_ax.plot(curve.index, curve["ppl"], "o-", ms=3.5, color=colour,
                        label=label + (f" (mean of {seeds} seeds)" if seeds > 1 else ""))
            ppl_ax.fill_between(curve.index, curve["lo"], curve["hi"], color=colour, alpha=.18, lw=0)
            replaced = curve[curve.index > 0]  # none replaced: KL 0, off a log axis
            kl_ax.plot(replaced.index, replaced["kl"], "o-", ms=3.5, color=colour)
            kl_ax.fill_between(replaced.index, replaced["kl_lo"], replaced["kl_hi"], color=colour, alpha=.18, lw=0)
        tokens = int(sweep.loc[sweep["split"] == split, "n_tokens"].max())
        ppl_ax.set(yscale="log", ylabel="perplexity", title=f"{split} ({tokens:,} tokens)")
        kl_ax.set(yscale="log", xlabel="fraction of heads replaced", ylabel="KL to unmodified (nats/token)")
        kl_ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        for ax in (ppl_ax, kl_ax):
            _plain_log_labels(ax.yaxis)
            ax.grid(alpha=.3, which="both")
    figure.tight_layout()
    _legend_above(figure)
    note = ("Bands: 95% bootstrap intervals over the evaluation sequences. KL: from the unmodified model's "
            "next-token distribution to the substituted model's, per predicted token; it is zero only when the "
            "model predicts exactly as before, while perplexity can stay level when it does not. Heads are "
            "replaced in order of their best program's val IoU, or (attribution) greedily by the KL their "
            "replacement is estimated to add given the heads already replaced, estimated on val; the uniform "
            "baseline replaces the heads of the IoU order with uniform causal attention.")
    return _svg_of(figure), note


def single_head_figure(single: pd.DataFrame, heads: pd.DataFrame,
                       substitution: SubstitutionSummary | None) -> tuple[str, str]:
    """Each measured head replaced alone: its test IoU against the perplexity cost, and (when the attribution
    order ran) the attribution's estimate of the KL to the unmodified model against the KL measured. Returns
    (svg, note)."""
    merged = single.merge(heads[["layer", "head", "test_iou"]], on=["layer", "head"])
    estimated = merged["estimated_kl"].notna().all() and (merged[["estimated_kl", "kl"]] > 0).all().all()
    figure = Figure(figsize=(9.6 if estimated else 5.2, 3.6))
    axes = figure.subplots(1, 2 if estimated else 1, squeeze=False)[0]
    ax = axes[0]
    ax.scatter(merged["test_iou"], 100 * merged["rel_increase"], s=14, color="#2c5fa8", alpha=.7)
    ax.axhline(0, color="#999", lw=.8)
    ax.set(xlabel="test IoU of the head's best program", ylabel="perplexity increase (%)", xlim=(0, 1),
           title="One head replaced at a time")
    ax.grid(alpha=.3)
    if estimated:
        ax = axes[1]
        ax.scatter(merged["estimated_kl"], merged["kl"], s=14, color="#c0392b", alpha=.7)
        low = min(merged["estimated_kl"].min(), merged["kl"].min())
        high = max(merged["estimated_kl"].max(), merged["kl"].max())
        ax.plot([low, high], [low, high], color="#999", lw=.8)
        ax.set(xscale="log", yscale="log", xlabel="estimated KL (attribution, val; nats/token)",
               ylabel="measured KL (nats/token)", title="The attribution estimate, checked")
        ax.grid(alpha=.3)
    figure.tight_layout()
    stats = substitution.single_head if substitution else None
    note = f"{len(merged)} heads spread over the IoU ranking, each replaced alone by its program."
    if stats is not None:
        note += f" Spearman correlation of IoU and perplexity cost: {stats.spearman_rho:.2f} (p = {stats.p_value:.2g})"
        if stats.iou_kl:
            note += (f"; of IoU and KL to the unmodified model: {stats.iou_kl['spearman_rho']:.2f} "
                     f"(p = {stats.iou_kl['p_value']:.2g})")
        if stats.estimated_kl:
            note += (f"; of the attribution order's estimated KL (on val, grey line: equal) and the KL measured: "
                     f"{stats.estimated_kl['spearman_rho']:.2f} (p = {stats.estimated_kl['p_value']:.2g})")
        note += "."
    return _svg_of(figure), note


QA_COLUMNS = ["task", "metric", "method", "fraction", "n_questions", "acc", "lo", "hi", "diff", "diff_lo", "diff_hi",
              "n_changed", "mcnemar_p"]


def qa_table(qa: QASummary) -> pd.DataFrame:
    """QA results from qa/summary.json as rows of task, metric, method, fraction, n_questions, acc with lo / hi
    (±1.96 lm-eval standard errors), and the paired comparison with the unmodified model on the same questions:
    diff (accuracy difference) with diff_lo / diff_hi (its paired 95% interval), n_changed, mcnemar_p (NaN
    in summaries written before QA was paired). Per task the metric is the one summary.json names for it, else
    acc_norm (length-normalised log-likelihood, the paper's scoring) when every row has it, else acc."""
    rows = pd.DataFrame(qa.results)
    if rows.empty:
        return pd.DataFrame(columns=QA_COLUMNS)
    parts = []
    for task, group in rows.groupby("task", sort=True):
        metric = qa.metrics.get(task) or \
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


def qa_figure(qa: QASummary) -> tuple[str, str]:
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


def qa_cell(qa: QASummary | None, fraction: float) -> str:
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


def library_curve_figure(curve: list[dict], library_size: int, cover_iou: float) -> tuple[str, str]:
    """Mean test (and val) IoU over heads against the size of the library, greedy order; the chosen library
    marked. Returns (svg, note)."""
    sizes = [point["size"] for point in curve]
    figure = Figure(figsize=(5.6, 3.6))
    ax = figure.add_subplot()
    ax.plot(sizes, [p["mean_test_iou"] for p in curve], "o-", color="#2c5fa8", label="test")
    ax.plot(sizes, [p["mean_val_iou"] for p in curve], "o--", color="#999", ms=3, label="val (chooses)")
    ax.plot([library_size], [cover_iou], "s", color="#d62728", ms=7, label=f"the library ({library_size} programs)")
    ax.set(xscale="log", xlabel="programs in the library", ylabel="mean IoU over heads",
           title="How many programs explain the model")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=.3, which="both")
    ax.legend(fontsize=8)
    note = ("The curve: the best library of each size by greedy facility location (most summed val IoU over heads; "
            "each head takes its best program in the library). The last point is the whole pool of causal "
            "programs; the square is the library itself (greedy set cover).")
    return _svg_of(figure), note
