# Library: all candidates of a model pooled and deduplicated, every program scored on every head, each
# head's best program chosen on val (causal programs only) and reported on test, plus the baselines.


def library_input(wildcards):
    heads = heads_of(wildcards.model)
    return {
        "synthesis": [f"results/{wildcards.model}/synthesis/L{l}H{h}" for l, h in heads],
        "rerank": [f"results/{wildcards.model}/rerank/L{l}H{h}.parquet" for l, h in heads],
        "attention": f"results/{wildcards.model}/attention",
        "examples": f"results/{wildcards.model}/data/examples.parquet",
        "info": f"results/{wildcards.model}/model/info.json",
    }


rule library:
    input:
        unpack(library_input),
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
