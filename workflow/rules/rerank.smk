# Rerank: every candidate of one head run once on every split; its scores on that head and its outputs
# (which the library and the report read instead of running programs again).


rule rerank:
    input:
        candidates="results/{model}/synthesis/L{layer}H{head}",
        head_inputs="results/{model}/synthesis/head_inputs.npz",
        info="results/{model}/model/info.json",
    output:
        table="results/{model}/rerank/L{layer}H{head}.parquet",
        outputs="results/{model}/rerank/L{layer}H{head}.npz",
    params:
        causal_check_examples=config["rerank"]["causal_check_examples"],
    log:
        "logs/{model}/rerank/L{layer}H{head}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/rerank.py"
