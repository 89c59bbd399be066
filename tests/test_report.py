"""The HTML report, built from a small synthetic results tree that follows docs/ARCHITECTURE.md."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attnprog import report
from attnprog.report.index import depth_profile
from attnprog.contracts import BASELINES, SCORES, SINGLE_HEADS, SWEEP, HeadId, HeadInputs, ModelInfo, RerankResult
from attnprog.contracts import BEST as BEST_TABLE
from attnprog.contracts import PROGRAMS as PROGRAMS_TABLE
from attnprog.contracts import (HeadlineMethod, LibrarySummary, ProgramScore, QASummary, SingleHeadStats, SplitExamples,
                                SubstitutionSummary, TransferProgram, TransferSummary)
from attnprog.matrices import normalise, pack
from attnprog.report.data import choose_examples, real_attention
from attnprog.scoring import soft_iou
from attnprog.settings import ReportSettings

N_LAYERS, N_HEADS = 2, 3
WORDS = "the cat sat on a mat and then the dog ran to the big red house by the old tree".split()

PROGRAMS = {
    "previous_token": ('"""Each token attends to the token just before it."""\nimport numpy as np\n\n\n'
                       "def attention(tokens):\n    n = len(tokens)\n    a = np.zeros((n, n))\n"
                       "    a[0, 0] = 1\n    for i in range(1, n):\n        a[i, i - 1] = 1\n    return a\n"),
    "first_token": ('"""Every token attends to the first token."""\nimport numpy as np\n\n\n'
                    "def attention(tokens):\n    a = np.zeros((len(tokens), len(tokens)))\n    a[:, 0] = 1\n"
                    "    return a\n"),
    "self_token": ('"""Each token attends to itself."""\nimport numpy as np\n\n\n'
                   "def attention(tokens):\n    return np.eye(len(tokens))\n"),
}
CATEGORY = {"previous_token": "positional", "first_token": "sink", "self_token": "positional"}
# Head (layer, head) -> its best program; previous_token explains three heads.
BEST = {(0, 0): "previous_token", (0, 1): "first_token", (0, 2): "previous_token",
        (1, 0): "self_token", (1, 1): "first_token", (1, 2): "previous_token"}


def example_tokens(i: int) -> list[str]:
    n = 6 + 3 * i
    return [WORDS[0].capitalize()] + [" " + w for w in WORDS[1:n]]


def noisy(matrix: np.ndarray, rng) -> np.ndarray:
    """A head's 'real' attention: the pattern plus causal noise, row-stochastic."""
    n = len(matrix)
    noise = np.tril(rng.random((n, n))) * 0.3
    out = np.tril(matrix + noise)
    return (out / out.sum(1, keepdims=True)).astype(np.float32)


def pattern(name: str, n: int) -> np.ndarray:
    if name == "previous_token":
        return np.eye(n, k=-1) + np.diag([1.0] + [0.0] * (n - 1))
    if name == "first_token":
        return np.tile(np.eye(n)[0], (n, 1))
    return np.eye(n)


def program_output(name: str, tokens: list[str]) -> np.ndarray | None:
    """What a program outputs on one example (normalised); self_token fails on texts over 18 tokens."""
    if name == "self_token" and len(tokens) > 18:
        return None
    return normalise(pattern(name, len(tokens)))


def make_results(root: Path, model: str = "tiny", with_downstream: bool = True) -> report.ModelInputs:
    """The files the report reads about a 2-layer, 3-head causal model, written through the contracts:
    head inputs, each source head's stored program outputs, the library tables, substitution and QA."""
    rng = np.random.default_rng(0)
    base = root / model
    heads = [HeadId(l, h) for l in range(N_LAYERS) for h in range(N_HEADS)]
    ModelInfo(model=model, load_path="/nowhere/tiny", architecture="LlamaForCausalLM", model_type="llama",
              n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=1, is_causal=True).write(base / "model" / "info.json")
    sizes = {"synth": 2, "val": 2, "test": 4}
    examples, start = {}, 0
    for split, k in sizes.items():
        tokens = [example_tokens(i) for i in range(start, start + k)]
        examples[split] = SplitExamples(list(range(start, start + k)), tokens, ["".join(t) for t in tokens])
        start += k
    attention = {(head, split): np.concatenate([pack(noisy(pattern(BEST[head.layer, head.head], len(t)), rng))
                                                for t in part.tokens])
                 for head in heads for split, part in examples.items()}
    HeadInputs.write(base / "synthesis" / "head_inputs.npz", examples, attention)
    # Each program was written for head (0, i) and its rerank job stored its outputs.
    rerank_outputs = {}
    for i, name in enumerate(PROGRAMS):
        splits = {}
        for split, part in examples.items():
            outputs = [program_output(name, t) for t in part.tokens]
            values = np.concatenate([pack(o) if o is not None else np.zeros(len(t) * (len(t) + 1) // 2)
                                     for o, t in zip(outputs, part.tokens)])[None]
            splits[split] = (np.array(part.example_ids), np.array(part.lengths), values,
                             np.array([[o is None for o in outputs]]))
        rerank_outputs[HeadId(0, i)] = base / "rerank" / f"L0H{i}.npz"
        score = ProgramScore(layer=0, head=i, name=name, file=f"{name}.py", origin="offline", status="ok", causal=True)
        RerankResult([score], [name], splits).write(rerank_outputs[HeadId(0, i)])
    for head in heads:  # heads whose candidates all failed: their rerank jobs stored no outputs
        if head not in rerank_outputs:
            rerank_outputs[head] = base / "rerank" / f"{head.name}.npz"
            RerankResult([], [], {split: (np.array(part.example_ids), np.array(part.lengths),
                                        np.zeros((0, sum(n * (n + 1) // 2 for n in part.lengths))),
                                        np.zeros((0, len(part.example_ids)), dtype=bool))
                                for split, part in examples.items()}).write(rerank_outputs[head])
    library = base / "library"
    (library / "programs").mkdir(parents=True)
    for name, source in PROGRAMS.items():
        (library / "programs" / f"{name}.py").write_text(source)
    PROGRAMS_TABLE.write([{"name": name, "origin": "offline", "source_layer": 0, "source_head": i,
                           "description": source.split('"""')[1], "category": CATEGORY[name], "causal": True,
                           "trusted": True, "n_terms": None, "source_chars": len(source), "in_library": True,
                           "library_rank": i} for i, (name, source) in enumerate(PROGRAMS.items())],
                         library / "programs.parquet")
    scores = pd.DataFrame([{"program": p, "layer": l, "head": h, "split": s,
                            "iou": (0.8 if BEST[l, h] == p else 0.2) + 0.1 * rng.random(), "jsd": 0.3,
                            "output_error": np.nan}
                           for p in PROGRAMS for (l, h) in BEST for s in ("synth", "val", "test")])
    SCORES.write(scores, library / "scores.parquet")
    best = scores[scores["program"] == scores.apply(lambda r: BEST[r["layer"], r["head"]], axis=1)]
    best = best.pivot_table(index=["layer", "head", "program"], columns="split", values="iou").reset_index()
    best = best.rename(columns={s: f"{s}_iou" for s in ("synth", "val", "test")}).assign(causal=True)
    best = best.assign(**{f"{s}_output_error": np.nan for s in ("synth", "val", "test")})
    BEST_TABLE.write(best, library / "best.parquet")
    BASELINES.write(pd.DataFrame([{"baseline": b, "layer": l, "head": h, "split": s, "iou": 0.3 * rng.random()}
                                  for b in ("uniform", "first_token") for (l, h) in BEST for s in ("val", "test")]),
                    library / "baselines.parquet")
    LibrarySummary(
        model=model, n_heads=len(BEST), library_size=len(PROGRAMS), pool_size=5, n_candidates=9,
        mean_val_iou=float(best["val_iou"].mean()), mean_test_iou=float(best["test_iou"].mean()),
        mean_synth_iou=float(best["synth_iou"].mean()),
        unrestricted={"mean_val_iou": 0.9, "mean_test_iou": 0.88, "programs_used": 4}, mean_terms=None,
        library_curve=[{"size": 1, "mean_val_iou": 0.5, "mean_test_iou": 0.45},
                       {"size": 3, "mean_val_iou": 0.85, "mean_test_iou": 0.84}],
        heads_per_program={}, n_causal_programs=len(PROGRAMS), splits={"synth": 3, "val": 3, "test": 3},
        selection="a test library",
        baselines={"uniform": 0.15, "first_token": 0.1},
        per_layer_test_iou={str(l): v for l, v in best.groupby("layer")["test_iou"].mean().items()},
    ).write(library / "summary.json")
    inputs = report.ModelInputs(
        info=base / "model" / "info.json", head_inputs=base / "synthesis" / "head_inputs.npz",
        programs=library / "programs.parquet", program_files=library / "programs", scores=library / "scores.parquet",
        best=library / "best.parquet", baselines=library / "baselines.parquet", library=library / "summary.json",
        rerank=rerank_outputs)
    if with_downstream:
        write_sweep(base, rng)
        write_qa(base, rng)
        inputs.sweep, inputs.single = base / "substitution" / "sweep.parquet", base / "substitution" / "single_heads.parquet"
        inputs.substitution, inputs.qa = base / "substitution" / "summary.json", base / "qa" / "summary.json"
    return inputs


FRACTIONS = [0.0, 0.25, 0.5, 1.0]


def write_sweep(base: Path, rng) -> None:
    """substitution/sweep.parquet with the columns attnprog.substitute.run_sweep returns."""
    rows = []
    for method, seeds in (("programs", [None]), ("uniform", [None]), ("random", [0, 1])):
        for seed in seeds:
            for fraction in FRACTIONS:
                ppl = 20 * (1 + fraction * {"programs": 0.5, "random": 1.0, "uniform": 4.0}[method])
                rel = ppl / 20 - 1
                rows.append({"method": method, "seed": seed, "fraction": fraction, "n_replaced": round(6 * fraction),
                             "split": "heldout", "n_tokens": 5000, "ppl": ppl, "ppl_lo": ppl * 0.95,
                             "ppl_hi": ppl * 1.05, "rel_increase": rel, "rel_lo": rel - 0.02, "rel_hi": rel + 0.02,
                             "kl": rel / 4, "kl_lo": rel / 5, "kl_hi": rel / 3})
    SWEEP.write(pd.DataFrame(rows), base / "substitution" / "sweep.parquet")
    SINGLE_HEADS.write(pd.DataFrame([{"layer": l, "head": h, "ppl": 20 + rng.random(), "rel_increase": 0.05 * rng.random(),
                                      "kl": 0.01 + 0.05 * rng.random(), "estimated_kl": 0.01 + 0.05 * rng.random()}
                                     for (l, h) in BEST]), base / "substitution" / "single_heads.parquet")
    curve = {f"{f:g}": 0.5 * f for f in FRACTIONS}
    SubstitutionSummary(
        model=base.name, split="heldout", baseline_ppl=20.0, n_tokens=5000, baseline_ppl_interval=[19.0, 21.0],
        best=HeadlineMethod(method="programs", chosen_on=None, rel_increase=curve, interval=None),
        n_replaced={f"{f:g}": round(6 * f) for f in FRACTIONS},
        splits={"heldout": {"baseline_ppl": 20.0, "n_tokens": 5000, "baseline_ppl_interval": [19.0, 21.0],
                            "programs": curve}},
        single_head=SingleHeadStats(n_heads=len(BEST), iou="test_iou", spearman_rho=-0.5, p_value=0.3,
                                    iou_kl={"spearman_rho": -0.25, "p_value": 0.5},
                                    estimated_kl={"spearman_rho": 0.75, "p_value": 0.02}),
    ).write(base / "substitution" / "summary.json")


def write_qa(base: Path, rng) -> None:
    """qa/summary.json's flat `results` rows, as attnprog.qa.summarise_qa writes them (copa without acc_norm)."""
    rows = []
    for task in ("piqa", "sciq", "copa"):
        for method in ("programs", "uniform"):
            for f in FRACTIONS:
                acc = 0.7 - f * (0.2 if method == "programs" else 0.4) + 0.02 * rng.random()
                row = {"task": task, "method": method, "fraction": f, "acc": acc, "acc_stderr": 0.03}
                if task != "copa":
                    row.update(acc_norm=acc + 0.1 * rng.random(), acc_norm_stderr=0.03)
                rows.append(row)
    QASummary(model=base.name, metrics={}, tasks={}, results=rows, max_drop={}).write(base / "qa" / "summary.json")


@pytest.fixture
def results(tmp_path):
    return make_results(tmp_path / "results")


def head_pages(out: Path) -> list[Path]:
    return sorted((out / "heads").glob("L*H*.html"))


def test_model_report_has_an_overview_and_a_page_per_head(results, tmp_path):
    out = tmp_path / "report" / "tiny"
    report.write_model_report(results, out, ReportSettings.defaults(), name="tiny")
    overview = (out / "index.html").read_text()
    assert [p.name for p in head_pages(out)] == sorted(f"{HeadId(l, h).name}.html" for (l, h) in BEST)
    for layer, head in BEST:
        assert f'href="heads/{HeadId(layer, head).name}.html"' in overview
    for section in ("iou", "baselines", "perplexity", "qa"):  # every figure is inline SVG
        assert "<svg" in re.search(rf'id="{section}">(.*?)</section>', overview, re.S).group(1), section
    assert "<img" not in overview
    assert "Spearman correlation of IoU and perplexity cost: -0.50" in overview
    assert "of IoU and KL to the unmodified model: -0.25" in overview and "and the KL measured: 0.75" in overview
    section = re.search(r'id="perplexity">(.*?)</section>', overview, re.S).group(1)
    assert "The attribution estimate, checked" in section  # the single-head figure's second panel
    assert not re.search(r'(src|href)="(https?:)?//|url\((?!#)|@import', overview)  # nothing fetched from the network


def test_head_page_shows_source_scores_and_the_other_heads_of_its_program(results, tmp_path):
    out = tmp_path / "report" / "tiny"
    report.write_model_report(results, out, ReportSettings.defaults(examples_per_head=2), name="tiny")
    page = (out / "heads" / "L0H0.html").read_text()
    assert "Each token attends to the token just before it." in page
    best = pd.read_parquet(results.best).set_index(["layer", "head"])
    assert f"{best.loc[(0, 0), 'test_iou']:.3f}" in page and f"{best.loc[(0, 0), 'val_iou']:.3f}" in page
    others = re.search(r'id="also">(.*?)</section>', page, re.S).group(1)
    assert sorted(re.findall(r'href="(L\dH\d)\.html"', others)) == ["L0H2", "L1H2"]
    assert page.count("data:image/png;base64,") == 2 * 2  # real + program on each of 2 examples


def test_head_page_iou_is_the_iou_of_the_shown_matrices(results, tmp_path):
    out = tmp_path / "report" / "tiny"
    report.write_model_report(results, out, ReportSettings.defaults(examples_per_head=1), name="tiny")
    examples = choose_examples(results, 1)
    real = real_attention(results, [HeadId(1, 0)], examples)
    tokens = examples[0]["tokens"]
    expected = soft_iou(real[1, 0, examples[0]["example_id"]], np.eye(len(tokens)))
    page = (out / "heads" / "L1H0.html").read_text()
    assert f"IoU {expected:.3f}" in page


def test_missing_library_table_is_named(results, tmp_path):
    results.best.unlink()
    with pytest.raises(report.ReportError, match="best.parquet"):
        report.write_model_report(results, tmp_path / "out", ReportSettings.defaults())
    assert not (tmp_path / "out").exists()  # nothing half-written


# ---- headless Chromium: the pages render, with their images ----

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian package chromium not installed (make system)")


def chromium(url: str, *args: str, tmp: Path) -> str:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp / 'chromium-profile'}", "--window-size=1400,3000",
               "--virtual-time-budget=3000", *args, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_chromium
def test_chromium_renders_overview_and_head_pages(results, tmp_path):
    out = tmp_path / "report" / "tiny"
    report.write_model_report(results, out, ReportSettings.defaults(), name="tiny")
    dom = chromium((out / "index.html").as_uri(), "--dump-dom", tmp=tmp_path)
    assert len(re.findall(r'<a href="heads/L\dH\d\.html"', dom)) >= 2 * len(BEST)  # both maps + the table
    for section in ("iou", "baselines", "perplexity", "qa"):
        assert re.search(rf'id="{section}">.*?<svg .*?</section>', dom, re.S), section
    assert "heldout (5,000 tokens)" in dom and "copa" in dom  # the plots' own text rendered
    dom = chromium((out / "heads" / "L0H1.html").as_uri(), "--dump-dom", tmp=tmp_path)
    assert len(re.findall(r"<image [^>]*href=\"data:image/png", dom)) == 2 * 3
    assert "Every token attends to the first token." in dom
    shot = tmp_path / "overview.png"
    chromium((out / "index.html").as_uri(), f"--screenshot={shot}", tmp=tmp_path)
    pixels = plt_image(shot)
    assert pixels.shape[0] >= 1000 and pixels.reshape(-1, pixels.shape[-1]).std(0).max() > 0.05  # not blank


def plt_image(path: Path) -> np.ndarray:
    import matplotlib.image
    return matplotlib.image.imread(path)


def test_index_compares_models_and_links_to_each(tmp_path):
    inputs = {"tiny": make_results(tmp_path / "results", "tiny"),
              "tiny-no-downstream": make_results(tmp_path / "results", "tiny-no-downstream", with_downstream=False)}
    models = [report.ModelSummary.read(name, i.info, i.library, i.best, i.sweep, i.substitution, i.qa)
              for name, i in inputs.items()]
    transfer = TransferSummary(
        library_model="tiny", target_model="tiny-no-downstream", n_programs=7, n_heads=8, mean_test_iou=0.25,
        own_mean_test_iou=0.5, programs_used=3, universal_margin=0.05, universal_heads=2,
        programs=[TransferProgram(name="prog_first", description="the first token", heads=3, universal_heads=2,
                                  mean_test_iou=0.4)], heads=[], failed_examples={})
    index = report.write_index(models, tmp_path / "report" / "index.html", ReportSettings.defaults(fraction=0.25),
                               transfers=[transfer])
    page = index.read_text()
    transfer_row = page[page.index('id="transfer"'):]
    assert "0.250" in transfer_row and "0.500" in transfer_row and "50%" in transfer_row
    assert "prog_first (2 heads): the first token" in transfer_row and "2 of 8" in transfer_row
    assert 'href="tiny/index.html"' in page and 'href="tiny-no-downstream/index.html"' in page
    sweep = pd.read_parquet(inputs["tiny"].sweep)
    at = sweep[(sweep["method"] == "programs") & (sweep["fraction"] == 0.25)].iloc[0]
    assert f"{at['ppl']:.2f} ({at['rel_increase']:+.1%}" in page
    assert f"{at['kl']:.3f} [{at['kl_lo']:.3f}, {at['kl_hi']:.3f}]" in page
    summary = LibrarySummary.read(inputs["tiny"].library)
    assert f"{summary.mean_test_iou:.3f}" in page
    qa = pd.DataFrame(QASummary.read(inputs["tiny"].qa).results)
    qa = qa[qa["method"] == "programs"]
    scored = qa["acc_norm"].fillna(qa["acc"])  # the paper's length-normalised accuracy where the task has it
    before, after = (scored[qa["fraction"] == f].mean() for f in (0.0, 0.25))
    assert f"{before:.3f} → {after:.3f}" in page


# ---- the Snakemake rules: build the report from a finished results tree, then `snakemake --report` ----

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_report_rules_build_the_report_and_snakemake_report_embeds_it(tmp_path):
    """Only common.smk and report.smk are included: the upstream files are the fixture's, as a finished run
    would leave them."""
    # The inputs the config names exist (they are checked at start-up) and are older than the results.
    model_dir = tmp_path / "tiny-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"")
    (tmp_path / "corpus.txt").write_text("A short passage of English text.\n")
    make_results(tmp_path / "results", "tiny")
    (tmp_path / "results" / "tiny" / "library" / "programs").touch()  # directory inputs older than the outputs
    for name in ("workflow", "src", "envs"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "Snakefile").write_text(
        'configfile: "config.yaml"\ninclude: "workflow/rules/common.smk"\ninclude: "workflow/rules/data.smk"\n'
        'include: "workflow/rules/report.smk"\n'
        'rule all:\n    input: "results/report/index.html"\n    default_target: True\n')
    (tmp_path / "config.yaml").write_text(
        f"models:\n  tiny: {{local_dir: {model_dir}}}\n"
        "corpus:\n  source: {files: [corpus.txt]}\n"
        "qa: {tasks: [piqa]}\nreport: {examples_per_head: 2}\n")
    snakemake = [str(Path(sys.executable).with_name("snakemake")), "--cores", "1", "--directory", str(tmp_path),
                 "--snakefile", str(tmp_path / "Snakefile")]
    done = subprocess.run(snakemake, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "results/report/tiny/index.html").is_file()
    assert len(list((tmp_path / "results/report/tiny/heads").glob("*.html"))) == len(BEST)
    done = subprocess.run(snakemake + ["--report", str(tmp_path / "report.html")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    embedded = (tmp_path / "report.html").read_text()
    for page in ("results/report/index.html", "results/report/tiny/index.html"):  # each flagged page is in
        assert page in embedded, page
    assert '"Models"' in embedded and '"Overview"' in embedded  # ... under its category


def test_head_page_says_where_its_program_failed(results, tmp_path):
    """A program that failed on an example (as its rerank job recorded) is shown as failed there."""
    out = tmp_path / "report" / "tiny"
    # test examples of 18, 21, 24 tokens
    report.write_model_report(results, out, ReportSettings.defaults(examples_per_head=3), name="tiny")
    page = (out / "heads" / "L1H0.html").read_text()
    assert page.count("The program failed on this example") == 2
    assert page.count("data:image/png;base64,") == 3 + 1  # every real map, the program's only where it ran


def test_depth_profile_puts_models_of_different_depths_on_one_axis():
    best = pd.DataFrame({"layer": [0, 0, 2, 2, 3], "head": [0, 1, 0, 1, 0], "test_iou": [.2, .4, .5, .7, .9]})
    profile = depth_profile(best, n_layers=4)
    assert profile["layer"].tolist() == [0, 2, 3]
    np.testing.assert_allclose(profile["depth"], [0, .5, .75])
    np.testing.assert_allclose(profile["test_iou"], [.3, .6, .9])


def test_overview_shows_the_output_error_where_it_was_measured():
    """The library's mean test relative output error joins IoU on the overview, saying when it chose."""
    from types import SimpleNamespace

    from attnprog.report.pages import overview_cards

    from dataclasses import replace

    heads = pd.DataFrame({"val_iou": [0.6], "test_iou": [0.5]})
    summary = LibrarySummary(model="tiny", n_heads=1, n_candidates=1, pool_size=1, library_size=1, mean_val_iou=0.6,
                             mean_test_iou=0.5, mean_synth_iou=0.6, unrestricted={}, library_curve=[], mean_terms=1.0,
                             heads_per_program={}, baselines={}, per_layer_test_iou={}, n_causal_programs=1,
                             splits={}, selection="", choose_by="iou", mean_test_output_error=None)
    results = SimpleNamespace(info=SimpleNamespace(n_heads_total=1), heads=heads, programs=pd.DataFrame(),
                              summary=summary)
    assert not any("output error" in card["label"] for card in overview_cards(results))
    results.summary = replace(summary, mean_test_output_error=0.4321, choose_by="output")
    card = next(c for c in overview_cards(results) if "output error" in c["label"])
    assert card["value"] == "0.432" and "chose" in card["label"]
