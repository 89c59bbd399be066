# Rerank: every candidate of one head run once on every split; its scores on that head and its outputs
# (which the library and the report read instead of running programs again), in one file.


rule rerank:
    input:
        script=SCRIPTS / "rerank.py",  # a shell rule's script: declared, so editing it reruns
        candidates="results/{model}/synthesis/L{layer}H{head}",
        head_inputs="results/{model}/synthesis/head_inputs.npz",
        info="results/{model}/model/info.json",
    output:
        "results/{model}/rerank/L{layer}H{head}.npz",
    params:
        causal_check_examples=config["rerank"]["causal_check_examples"],
    benchmark:
        benchmark_path("rerank", "{model}", "L{layer}H{head}"),
    log:
        "logs/{model}/rerank/L{layer}H{head}.log",
    conda:
        CONDA_ENV
    shell:
        "python {input.script:q} --layer {wildcards.layer} --head {wildcards.head} --candidates {input.candidates}"
        " --head-inputs {input.head_inputs} --info {input.info}"
        " --causal-check-examples {params.causal_check_examples} --out {output} --log {log}"
