# Extraction: one batched forward pass per model, every head's attention to Parquet (one file per layer),
# then every head's attention on every split gathered into one file for the per-head jobs. With the offline
# synthesizer's output objective, the same pass records every head's value Grams too (value_grams() in
# common.smk: empty otherwise, so the default rules are as before).


rule extract:
    input:
        info="results/{model}/model/info.json",
        examples="results/{model}/data/examples.parquet",
    output:
        attention=directory("results/{model}/attention"),
        **value_grams(directory),
    params:
        batch_size=batch_size,
        device=config["device"],
    benchmark:
        benchmark_path("extract", "{model}"),
    log:
        "logs/{model}/extract.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/extract.py"


rule head_inputs:
    input:
        attention="results/{model}/attention",
        examples="results/{model}/data/examples.parquet",
        **value_grams(),
    output:
        "results/{model}/synthesis/head_inputs.npz",
    benchmark:
        benchmark_path("head_inputs", "{model}"),
    log:
        "logs/{model}/head_inputs.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/head_inputs.py"
