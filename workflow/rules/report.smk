# The report: per model an overview page and a page per head, and the cross-model index (the final target).
# Every page is a single file, so `snakemake --report report.html` embeds the index and each overview.

report: "../report/workflow.rst"

rule report_model:
    input:
        unpack(lambda w: {kind: f"results/{w.model}/{path}" for kind, path in MODEL_SUMMARY_FILES.items()}),
        head_inputs="results/{model}/synthesis/head_inputs.npz",
        programs="results/{model}/library/programs.parquet",
        program_files="results/{model}/library/programs",
        scores="results/{model}/library/scores.parquet",
        baselines="results/{model}/library/baselines.parquet",
        single="results/{model}/substitution/single_heads.parquet",
        rerank=per_head("results/{model}/rerank/{head}.npz"),
    output:
        overview=report(
            "results/report/{model}/index.html",
            caption="../report/model.rst",
            category="Models",
            labels={"model": "{model}", "page": "overview"},
        ),
        heads=directory("results/report/{model}/heads"),
    params:
        heads=lambda w: [[h.layer, h.head] for h in heads_of(w.model)],
        options=config["report"],
    benchmark:
        benchmark_path("report_model", "{model}"),
    log:
        "logs/{model}/report.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/report_model.py"


rule report:
    input:
        pages=expand("results/report/{model}/index.html", model=MODELS),  # the overviews the index links to
        transfer=[f"results/transfer/{a}/{b}.json" for a in MODELS for b in MODELS if a != b],
        **{
            kind: expand(f"results/{{model}}/{path}", model=MODELS)
            for kind, path in MODEL_SUMMARY_FILES.items()
        },
    output:
        report(
            "results/report/index.html",
            caption="../report/index.rst",
            category="Overview",
            labels={"page": "all models"},
        ),
    params:
        models=MODELS,
        options=config["report"],
    benchmark:
        benchmark_path("report"),
    log:
        "logs/report.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/report.py"
