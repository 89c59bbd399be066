# Extraction: one batched forward pass per model, every head's attention to Parquet (one file per layer).


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
