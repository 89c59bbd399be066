# Library: all candidates of a model pooled and deduplicated, every program scored on every head from the
# stored outputs, the library chosen as a small set cover, each head's program chosen on val (causal
# programs only) and reported on test, plus the baselines.


rule library:
    input:
        synthesis=per_head("results/{model}/synthesis/{head}"),
        rerank=per_head("results/{model}/rerank/{head}.npz"),
        head_inputs="results/{model}/synthesis/head_inputs.npz",
    output:
        programs=directory("results/{model}/library/programs"),
        table="results/{model}/library/programs.parquet",
        scores="results/{model}/library/scores.parquet",
        best="results/{model}/library/best.parquet",
        baselines="results/{model}/library/baselines.parquet",
        summary="results/{model}/library/summary.json",
    params:
        heads=lambda w: [[h.layer, h.head] for h in heads_of(w.model)],
        settings=config["library"],
    log:
        "logs/{model}/library.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/library.py"
