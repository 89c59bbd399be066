# The report: per model an overview page and a page per head, and the cross-model index (the final target).
# Every page is a single file, so `snakemake --report report.html` embeds the index and each overview.

report: "../report/workflow.rst"


rule report_model:
    input:
        info="results/{model}/model/info.json",
        examples="results/{model}/data/examples.parquet",
        attention="results/{model}/attention",
        programs="results/{model}/library/programs",
        table="results/{model}/library/programs.parquet",
        scores="results/{model}/library/scores.parquet",
        best="results/{model}/library/best.parquet",
        baselines="results/{model}/library/baselines.parquet",
        library="results/{model}/library/summary.json",
        sweep="results/{model}/substitution/sweep.parquet",
        single="results/{model}/substitution/single_heads.parquet",
        substitution="results/{model}/substitution/summary.json",
        qa=["results/{model}/qa/summary.json"] if config["qa"]["tasks"] else [],
    output:
        overview=report(
            "results/report/{model}/index.html",
            caption="../report/model.rst",
            category="Models",
            labels={"model": "{model}", "page": "overview"},
        ),
        heads=directory("results/report/{model}/heads"),
    params:
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
        options=config["report"],
    log:
        "logs/report.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/report.py"
