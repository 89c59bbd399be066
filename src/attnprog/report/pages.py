"""One model's pages: the overview (IoU and category per head, baselines, library size, perplexity, QA) and a
page per head (real against program attention, the program's source, scores, other heads it explains)."""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader
from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from .. import __version__
from ..atomic import atomic_dir, write_text
from ..contracts import HeadId
from ..scoring import soft_iou
from ..settings import ReportSettings
from .data import (ModelInputs, ModelResults, ReportError, choose_examples, head_ids, main_split, program_attention,
                   read_model_results, real_attention)
from .figures import (IOU_CMAP, _colour, _inline, attention_svg, category_colours, head_grid_svg, iou_scale_legend,
                      layer_iou_figure, library_curve_figure, perplexity_figure, qa_figure, single_head_figure)

def environment() -> Environment:
    env = Environment(loader=PackageLoader("attnprog", "report_templates"), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    css = (Path(__file__).parents[1] / "report_templates" / "style.css").read_text()
    css += HtmlFormatter(style="friendly").get_style_defs(".hl")
    env.globals.update(css=Markup(css), version=__version__,
                       head_name=lambda layer, head: HeadId(int(layer), int(head)).name)
    return env


def head_page(layer: int, head: int) -> str:
    """A head's page in the model's heads/ folder."""
    return f"{HeadId(int(layer), int(head)).name}.html"


def head_href(layer: int, head: int) -> str:
    return f"heads/{head_page(layer, head)}"


HTML_FORMATTER = HtmlFormatter(cssclass="hl")


def highlighted_source(path: Path) -> Markup:
    if not path.is_file():
        return Markup(f'<p class="muted">Source file missing: <code>{html.escape(str(path))}</code></p>')
    return Markup(highlight(path.read_text(), PythonLexer(), HTML_FORMATTER))


def alternatives_by_head(results: ModelResults, k: int) -> dict[HeadId, list[dict]]:
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
    out: dict[HeadId, list[dict]] = {}
    for row in table.itertuples():
        out.setdefault(HeadId(int(row.layer), int(row.head)), []).append(
            {"program": row.program, "val_iou": row.val, "test_iou": getattr(row, "test", np.nan),
             "description": descriptions.get(row.program, "")})
    return out


def baselines_by_head(results: ModelResults) -> dict[HeadId, list[dict]]:
    """Per head, each baseline's test IoU, best first."""
    test = results.baselines[results.baselines["split"] == "test"].sort_values("iou", ascending=False)
    out: dict[HeadId, list[dict]] = {}
    for row in test.itertuples():
        out.setdefault(HeadId(int(row.layer), int(row.head)), []).append({"name": row.baseline, "iou": row.iou})
    return out


def head_examples(layer: int, head: int, program: str, examples: list[dict], real: dict, predicted: dict,
                  program_maps: dict, causal: bool) -> list[dict]:
    """The head's real attention beside its program's on each chosen example, with the IoU of the two."""
    shown = []
    for j, ex in enumerate(examples):
        actual = real.get((layer, head, int(ex["example_id"])))
        if actual is None:
            raise ReportError(f"report: no attention for {HeadId(layer, head)} example {ex['example_id']}")
        mine = predicted[program][j]  # None: the program failed on this example
        shown.append({"example_id": int(ex["example_id"]), "n": int(ex["n"]), "text": ex["text"],
                      "real": attention_svg(actual, ex["tokens"], causal), "program": program_maps[program, j],
                      "iou": None if mine is None else soft_iou(actual, mine)})
    return shown


def render_head_pages(results: ModelResults, env: Environment, out_dir: Path, settings: ReportSettings,
                      has_index: bool) -> int:
    """Write a page per head that has a program into `out_dir` (head_page); returns how many."""
    examples = choose_examples(results.inputs, settings.examples_per_head)
    real = real_attention(results.inputs, head_ids(results.heads), examples)
    causal = results.info.is_causal
    names = sorted(results.heads["program"].unique())
    predicted = program_attention(results, names, examples)
    program_maps = {(name, j): None if matrix is None else attention_svg(matrix, examples[j]["tokens"], causal)
                    for name, matrices in predicted.items() for j, matrix in enumerate(matrices)}
    sources = {name: highlighted_source(program_file(results, name)) for name in names}
    alternatives = alternatives_by_head(results, settings.alternatives_per_head)
    baselines = baselines_by_head(results)
    colours = category_colours(results.heads["category"].fillna("uncategorised").tolist())
    rows = results.heads.to_dict("records")
    pages = [head_page(h["layer"], h["head"]) for h in rows]
    heads_of = results.heads.groupby("program")[["layer", "head", "test_iou"]].apply(lambda g: g.to_dict("records"))
    template = env.get_template("head.html")
    for i, h in enumerate(rows):
        layer, head = int(h["layer"]), int(h["head"])
        h["category"] = h["category"] if isinstance(h["category"], str) else "uncategorised"
        h["colour"] = colours[h["category"]]
        also = [{**o, "href": head_page(o["layer"], o["head"])} for o in heads_of[h["program"]]
                if (o["layer"], o["head"]) != (layer, head)]
        page = template.render(
            model=results.name, has_index=has_index, h=h, also=also, source=sources[h["program"]],
            examples=head_examples(layer, head, h["program"], examples, real, predicted, program_maps, causal),
            baselines=baselines.get(HeadId(layer, head), []), alternatives=alternatives.get(HeadId(layer, head), []),
            prev=pages[i - 1] if i > 0 else None, next=pages[i + 1] if i + 1 < len(rows) else None,
            examples_note=f"The {len(examples)} shortest test examples; every head shows the same ones.")
        (out_dir / pages[i]).write_text(page)
    return len(rows)


def program_file(results: ModelResults, name: str) -> Path:
    """A library program's file: programs/{name}.py, or programs/{stem}.py for a reference-signature
    program named "{stem}.{function}"."""
    folder = results.inputs.program_files
    path = folder / f"{name}.py"
    return path if path.is_file() else folder / f"{name.rsplit('.', 1)[0]}.py"


def overview_cards(results: ModelResults) -> list[dict]:
    s = results.summary
    total = results.info.n_heads_total
    cards = [{"value": f"{len(results.heads)}", "label": f"heads with a program (of {total})"},
             {"value": f"{s.library_size}", "label": "programs in the library"},
             {"value": f"{s.mean_test_iou:.3f}", "label": "mean test IoU"},
             {"value": f"{s.mean_val_iou:.3f}", "label": "mean val IoU"}]
    if s.mean_test_output_error is not None:  # value Grams recorded (synthesis.offline.objective: output)
        chose = " (chose the programs)" if s.choose_by == "output" else ""
        cards.append({"value": f"{s.mean_test_output_error:.3f}", "label": f"mean test relative output error{chose}"})
    if s.baselines:
        name, iou = max(s.baselines.items(), key=lambda item: item[1])
        cards.append({"value": f"{iou:.3f}", "label": f"best baseline ({name})"})
    return cards


SOURCE_NAMES = {"offline": "offline synthesizer", "llm": "LLM (first turn and refinement)",
                "hybrid": "hybrid (LLM improving the offline fit)", "all": "all pooled"}


def explainer_rows(results: ModelResults) -> list[dict]:
    """The LLM beside the offline synthesizer: one row per source of candidates (library/explainers.json)."""
    if results.explainers is None:
        return []
    return [{"name": SOURCE_NAMES.get(s.source, s.source), "val": s.mean_val_iou, "test": s.mean_test_iou,
             "found": s.heads_with_program} for s in results.explainers.sources]


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
    n_layers, n_heads = results.info.n_layers, results.info.n_heads
    heads = results.heads.copy()
    heads["category"] = heads["category"].where(heads["category"].map(lambda c: isinstance(c, str)),
                                                "uncategorised")
    colours = category_colours(heads["category"].tolist())
    show_text = n_heads <= 32
    iou_cells, category_cells = {}, {}
    for h in heads.itertuples():
        key, href = (int(h.layer), int(h.head)), head_href(h.layer, h.head)
        title = f"{HeadId(int(h.layer), int(h.head))}: {h.program} — {h.description} (test IoU {h.test_iou:.3f})"
        iou_cells[key] = {"fill": _colour(IOU_CMAP, h.test_iou), "href": href, "title": title,
                          "text": f"{h.test_iou:.2f}".lstrip("0") if show_text else ""}
        category_cells[key] = {"fill": colours[h.category], "href": href, "title": f"{h.category} — {title}"}
    figures = {"layers": _inline(layer_iou_figure(heads, results.baselines)), "perplexity": None, "qa": None,
               "single": None, "library": None}
    perplexity_note = qa_note = single_note = library_note = ""
    if results.summary.library_curve:
        svg, library_note = library_curve_figure(results.summary.library_curve, results.summary.library_size,
                                                 results.summary.mean_test_iou)
        figures["library"] = _inline(svg)
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
        method_rows=method_rows(results), explainer_rows=explainer_rows(results), figures=figures, perplexity_note=perplexity_note, qa_note=qa_note,
        single_note=single_note, library_note=library_note,
        heads=[{**h, "href": head_href(h["layer"], h["head"])} for h in heads.to_dict("records")])
    return page


def write_model_report(inputs: ModelInputs, out_dir: str | Path, settings: ReportSettings, name: str = "model",
                       has_index: bool = True) -> Path:
    """Write one model's overview `out_dir`/index.html and its head pages `out_dir`/heads/ (each atomically)."""
    results = read_model_results(inputs, name)
    env = environment()
    overview = render_model_overview(results, env, has_index)
    with atomic_dir(Path(out_dir) / "heads") as tmp:
        render_head_pages(results, env, tmp, settings, has_index)
        tmp.chmod(0o755)  # a temporary folder is private; the report is for reading
    write_text(Path(out_dir) / "index.html", overview)
    return Path(out_dir) / "index.html"
