# Library: all candidates of a model pooled and deduplicated, every program scored on every head, each
# head's best program chosen on val (causal programs only) and reported on test, plus the baselines.


rule library:
    input:
        synthesis=lambda w: [f"results/{w.model}/synthesis/L{l}H{h}" for l, h in heads_of(w.model)],
        rerank=lambda w: [f"results/{w.model}/rerank/L{l}H{h}.parquet" for l, h in heads_of(w.model)],
        attention="results/{model}/attention",
        examples="results/{model}/data/examples.parquet",
        info="results/{model}/model/info.json",
    output:
        programs=directory("results/{model}/library/programs"),
        table="results/{model}/library/programs.parquet",
        scores="results/{model}/library/scores.parquet",
        best="results/{model}/library/best.parquet",
        baselines="results/{model}/library/baselines.parquet",
        summary="results/{model}/library/summary.json",
    params:
        settings=config["library"],
    log:
        "logs/{model}/library.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/library.py"
