# Extraction: one batched forward pass per model, every head's attention to Parquet (one file per layer),
# then every head's attention on every split gathered into one file for the per-head jobs.


rule extract:
    input:
        info="results/{model}/model/info.json",
        examples="results/{model}/data/examples.parquet",
    output:
        directory("results/{model}/attention"),
    params:
        batch_size=batch_size,
        device=config["device"],
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
    output:
        "results/{model}/synthesis/head_inputs.npz",
    log:
        "logs/{model}/head_inputs.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/head_inputs.py"
