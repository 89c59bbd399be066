# The report: per model an overview page and a page per head, and the cross-model index (the final target).
# Every page is a single file, so `snakemake --report report.html` embeds the index and each overview.

report: "../report/workflow.rst"


def report_model_inputs(wildcards):
    results = f"results/{wildcards.model}"
    inputs = {
        "info": f"{results}/model/info.json",
        "examples": f"{results}/data/examples.parquet",
        "attention": f"{results}/attention",
        "programs": f"{results}/library/programs",
        "table": f"{results}/library/programs.parquet",
        "scores": f"{results}/library/scores.parquet",
        "best": f"{results}/library/best.parquet",
        "baselines": f"{results}/library/baselines.parquet",
        "library": f"{results}/library/summary.json",
        "sweep": f"{results}/substitution/sweep.parquet",
        "single": f"{results}/substitution/single_heads.parquet",
        "substitution": f"{results}/substitution/summary.json",
    }
    if config["qa"]["tasks"]:
        inputs["qa"] = f"{results}/qa/summary.json"
    return inputs


rule report_model:
    input:
        unpack(report_model_inputs),
    output:
        overview=report(
            "results/report/{model}/index.html",
            caption="../report/model.rst",
            category="Models",
            labels={"model": "{model}", "page": "overview"},
        ),
        heads=directory("results/report/{model}/heads"),
    params:
        results="results/{model}",
        out_dir="results/report/{model}",
        options=config["report"],
    log:
        "logs/{model}/report.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/report.py"


rule report:
    input:
        pages=expand("results/report/{model}/index.html", model=MODELS),
        libraries=expand("results/{model}/library/summary.json", model=MODELS),
    output:
        report(
            "results/report/index.html",
            caption="../report/index.rst",
            category="Overview",
            labels={"page": "all models"},
        ),
    params:
        results={model: f"results/{model}" for model in MODELS},
        options=config["report"],
    log:
        "logs/report.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/report.py"
