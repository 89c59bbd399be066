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
    benchmark:
        benchmark_path("library", "{model}"),
    log:
        "logs/{model}/library.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/library.py"


# synthesis.llm: the LLM explainer beside the offline synthesizer, compared on the heads it was sampled for.
rule explainers:
    input:
        synthesis=lambda w: [f"results/{w.model}/synthesis/{h.name}" for h in llm_heads(w.model)],
        rerank=lambda w: [f"results/{w.model}/rerank/{h.name}.npz" for h in llm_heads(w.model)],
        programs="results/{model}/library/programs.parquet",
        best="results/{model}/library/best.parquet",
    output:
        "results/{model}/library/explainers.json",
    benchmark:
        benchmark_path("explainers", "{model}"),
    log:
        "logs/{model}/explainers.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/explainers.py"


# Cross-model transfer: one model's library run on another model's val and test examples (token strings) and
# scored against that model's heads. One job per ordered pair, so adding a model leaves the old pairs alone.
rule transfer:
    input:
        programs="results/{source}/library/programs.parquet",
        program_files="results/{source}/library/programs",
        head_inputs="results/{target}/synthesis/head_inputs.npz",
        best="results/{target}/library/best.parquet",
        info="results/{target}/model/info.json",
    output:
        "results/transfer/{source}/{target}.json",
    benchmark:
        benchmark_path("transfer", job="{source}/{target}"),
    log:
        "logs/transfer/{source}/{target}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/transfer.py"
