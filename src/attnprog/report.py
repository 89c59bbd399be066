"""The HTML report: a folder a person opens from disk (no network, no CDN) that stays fast with 700+ heads.

    results/report/index.html                     the models side by side, a link to each
    results/report/{model}/index.html             overview: IoU and category per head, baselines, perplexity, QA
    results/report/{model}/heads/L{l}H{h}.html    one small page per head: real vs program attention, source
    results/report/{model}/figures/*.svg          the overview's plots, loaded lazily

The overview's layer x head maps are inline SVG whose cells link to the head pages. A head page carries its
own attention maps as small inline PNGs inside SVG (token labels stay text), so every page renders alone.
Every figure says which split it comes from: test, unless it says otherwise.
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.image
import matplotlib.ticker
import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader
from markupsafe import Markup
from matplotlib.figure import Figure
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from . import __version__
from .atomic import atomic_dir, write_text
from .extract import layer_file, read_layer_attention
from .programs import load_programs, run_programs
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
        sweep=pd.read_parquet(sub_dir / "sweep.parquet") if (sub_dir / "sweep.parquet").is_file() else None,
        qa=_read_json(qa_dir / "summary.json") if (qa_dir / "summary.json").is_file() else None,
    )


# ---------------------------------------------------------------------------------------------------------
# Pictures: SVG built by hand where cells must be links or labels must stay text, matplotlib for plots

def _colour(cmap: str, value: float) -> str:
    return matplotlib.colors.to_hex(matplotlib.colormaps[cmap](float(np.clip(value, 0.0, 1.0))))


def category_colours(categories: list[str]) -> dict[str, str]:
    """A fixed colour per category, most frequent first (tab20 has room for 20, then it repeats)."""
    palette = matplotlib.colormaps["tab20"].colors
    ordered = pd.Series(categories).value_counts().index
    return {c: matplotlib.colors.to_hex(palette[(2 * i) % 20 + (2 * i) // 20 % 2]) for i, c in enumerate(ordered)}


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


def attention_png(matrix: np.ndarray, causal: bool) -> str:
    """A data URI of an n x n PNG, one pixel per entry: colour = sqrt(weight), the unseen future grey."""
    rgba = matplotlib.colormaps[ATTENTION_CMAP](np.sqrt(np.clip(matrix, 0.0, 1.0)))
    if causal:
        rgba[np.triu_indices(matrix.shape[0], k=1)] = FUTURE_GREY
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, rgba, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def token_label(token: str, width: int = 12) -> str:
    """A token as an axis label: whitespace made visible, long tokens cut."""
    label = token.replace("\n", "⏎").replace("\t", "⇥").strip() or "␣"
    return label if len(label) <= width else label[: width - 1] + "…"


def attention_svg(matrix: np.ndarray, tokens: list[str], causal: bool) -> Markup:
    """An attention map with its tokens written along both axes (rows attend, columns are attended to)."""
    n = len(tokens)
    cell = int(np.clip(440 // max(n, 1), 5, 16))
    font = min(cell - 1, 11)
    labels = [html.escape(token_label(t)) for t in tokens]
    margin = int(max(len(token_label(t)) for t in tokens) * font * 0.62) + 6 if n else 6
    size = n * cell
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{margin + size + 2}" height="{margin + size + 2}" '
             f'font-family="sans-serif" font-size="{font}">',
             f'<image x="{margin}" y="{margin}" width="{size}" height="{size}" preserveAspectRatio="none" '
             f'style="image-rendering:pixelated" href="{attention_png(matrix, causal)}"/>',
             f'<rect x="{margin}" y="{margin}" width="{size}" height="{size}" fill="none" stroke="#999"/>']
    for i, label in enumerate(labels):
        centre = margin + (i + .5) * cell
        parts.append(f'<text x="{margin - 3}" y="{centre}" text-anchor="end" dominant-baseline="central">{label}</text>')
        parts.append(f'<text transform="translate({centre},{margin - 3}) rotate(-90)" '
                     f'dominant-baseline="central">{label}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _svg_of(figure: Figure) -> str:
    """A matplotlib figure as SVG text with real <text> (small, and searchable)."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "attnprog"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return buffer.getvalue()


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
    """{(layer, head, example_id): matrix} for the chosen examples, one layer file read at a time."""
    wanted, out = set(example_ids), {}
    for layer in range(int(results.info["n_layers"])):
        path = layer_file(results.root / "attention", layer)
        if not path.is_file():
            raise ReportError(f"report: missing input {path}")
        for (head, example_id), matrix in read_layer_attention(path).items():
            if example_id in wanted:
                out[layer, head, example_id] = matrix
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


def highlighted_source(path: Path) -> Markup:
    if not path.is_file():
        return Markup(f'<p class="muted">Source file missing: <code>{html.escape(str(path))}</code></p>')
    return Markup(highlight(path.read_text(), PythonLexer(), HtmlFormatter(cssclass="hl")))


def head_alternatives(results: ModelResults, layer: int, head: int, best: str, k: int) -> list[dict]:
    """The k programs after the best one for this head, by val IoU, with their test IoU."""
    if k <= 0:
        return []
    rows = results.scores[(results.scores["layer"] == layer) & (results.scores["head"] == head)]
    table = rows.pivot_table(index="program", columns="split", values="iou")
    if "val" not in table:
        return []
    table = table.drop(index=best, errors="ignore").sort_values("val", ascending=False).head(k)
    return [{"program": name, "val_iou": row["val"], "test_iou": row.get("test", np.nan),
             "description": results.programs["description"].get(name, "")} for name, row in table.iterrows()]


def head_baselines(results: ModelResults, layer: int, head: int) -> list[dict]:
    rows = results.baselines[(results.baselines["layer"] == layer) & (results.baselines["head"] == head)
                             & (results.baselines["split"] == "test")]
    return [{"name": r.baseline, "iou": r.iou} for r in rows.sort_values("iou", ascending=False).itertuples()]


def render_head_pages(results: ModelResults, env: Environment, out_dir: Path, options: dict,
                      has_index: bool) -> int:
    """Write heads/L{l}H{h}.html for every head that has a best program; returns how many."""
    examples = choose_examples(pd.read_parquet(results.root / "data" / "examples.parquet"),
                               options["examples_per_head"])
    real = real_attention(results, examples["example_id"].tolist())
    calls = [(list(tokens), text) for tokens, text in zip(examples["tokens"], examples["text"])]
    names = sorted(results.heads["program"].unique())
    predicted = program_attention(results, names, calls) if calls else {n: [] for n in names}
    colours = category_colours(results.heads["category"].fillna("uncategorised").tolist())
    causal = bool(results.info.get("is_causal", True))
    template = env.get_template("head.html")
    (out_dir / "heads").mkdir(parents=True, exist_ok=True)
    rows = results.heads.to_dict("records")
    for i, h in enumerate(rows):
        layer, head = int(h["layer"]), int(h["head"])
        h["category"] = h["category"] if isinstance(h["category"], str) else "uncategorised"
        h["colour"] = colours[h["category"]]
        shown = []
        for j, ex in examples.iterrows():
            actual = real.get((layer, head, int(ex["example_id"])))
            if actual is None:
                raise ReportError(f"report: no attention for L{layer}H{head} example {ex['example_id']}")
            mine = predicted[h["program"]][j]  # None: the program failed on this example
            shown.append({"example_id": int(ex["example_id"]), "n": int(ex["n"]), "text": ex["text"],
                          "real": attention_svg(actual, ex["tokens"], causal),
                          "program": None if mine is None else attention_svg(mine, ex["tokens"], causal),
                          "iou": None if mine is None else soft_iou(actual, mine)})
        also = [{"layer": o["layer"], "head": o["head"], "test_iou": o["test_iou"],
                 "href": f"L{o['layer']}H{o['head']}.html"}
                for o in rows if o["program"] == h["program"] and (o["layer"], o["head"]) != (layer, head)]
        page = template.render(
            model=results.name, has_index=has_index, h=h, examples=shown, also=also,
            baselines=head_baselines(results, layer, head),
            alternatives=head_alternatives(results, layer, head, h["program"], options["alternatives_per_head"]),
            source=highlighted_source(program_file(results, h["program"])),
            prev=f"L{rows[i - 1]['layer']}H{rows[i - 1]['head']}.html" if i > 0 else None,
            next=f"L{rows[i + 1]['layer']}H{rows[i + 1]['head']}.html" if i + 1 < len(rows) else None,
            examples_note=f"The {len(shown)} shortest test examples; every head shows the same ones.")
        (out_dir / head_href(layer, head)).write_text(page)
    return len(rows)


def overview_cards(results: ModelResults) -> list[dict]:
    s = results.summary
    cards = [{"value": f"{s.get('n_heads', len(results.heads))}", "label": "heads explained"},
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


def render_model_overview(results: ModelResults, env: Environment, out_dir: Path, has_index: bool) -> None:
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
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    (figures_dir / "layers.svg").write_text(layer_iou_figure(heads, results.baselines))
    figures = {"layers": "figures/layers.svg", "perplexity": None, "qa": None}
    perplexity_note = qa_note = ""
    if results.sweep is not None and len(results.sweep):
        svg, perplexity_note = perplexity_figure(results.sweep)
        (figures_dir / "perplexity.svg").write_text(svg)
        figures["perplexity"] = "figures/perplexity.svg"
    if results.qa:
        svg, qa_note = qa_figure(results.qa)
        if svg:
            (figures_dir / "qa.svg").write_text(svg)
            figures["qa"] = "figures/qa.svg"
    counts = heads["category"].value_counts()
    page = env.get_template("model.html").render(
        m=results, cards=overview_cards(results), has_index=has_index,
        iou_grid=head_grid_svg(n_layers, n_heads, iou_cells), iou_scale=iou_scale_legend(),
        category_grid=head_grid_svg(n_layers, n_heads, category_cells),
        categories=[{"name": c, "colour": colours[c], "count": int(counts[c])} for c in counts.index],
        method_rows=method_rows(results), figures=figures, perplexity_note=perplexity_note, qa_note=qa_note,
        heads=[{**h, "href": head_href(h["layer"], h["head"])} for h in heads.to_dict("records")])
    (out_dir / "index.html").write_text(page)


def write_model_report(results_dir: str | Path, out_dir: str | Path, options: dict | None = None,
                       name: str | None = None, has_index: bool = True) -> Path:
    """Write one model's overview and head pages into `out_dir` (replaced whole, atomically)."""
    options = {**DEFAULTS, **(options or {})}
    results = read_model_results(results_dir, name)
    env = _environment()
    with atomic_dir(out_dir) as tmp:
        render_model_overview(results, env, tmp, has_index)
        render_head_pages(results, env, tmp, options, has_index)
        tmp.chmod(0o755)  # a temporary folder is private; the report is for reading
    return Path(out_dir) / "index.html"
