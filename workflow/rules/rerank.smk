# Rerank: every candidate of one head scored on the val split (soft IoU, row JS distance).


rule rerank:
    input:
        candidates="results/{model}/synthesis/L{layer}H{head}",
        head_inputs="results/{model}/synthesis/head_inputs.npz",
        info="results/{model}/model/info.json",
    output:
        "results/{model}/rerank/L{layer}H{head}.parquet",
    log:
        "logs/{model}/rerank/L{layer}H{head}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/rerank.py"
