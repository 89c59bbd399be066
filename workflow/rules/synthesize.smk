# Synthesis: candidate programs per head. The offline synthesizer (default) fits readable log-linear
# programs to a head's synth-split attention from primitives computed once per model; the LLM backends
# (claude, open_weights) write their candidates in the same format. Per-model rules gather what the
# per-head jobs need into two .npz files, so each of the hundreds of per-head jobs starts and loads fast.


rule synth_features:
    input:
        examples="results/{model}/data/examples.parquet",
    output:
        "results/{model}/synthesis/features.npz",
    params:
        n_words=config["synthesis"]["offline"]["n_words"],
    log:
        "logs/{model}/synth_features.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/synth_features.py"


rule synthesize:
    input:
        script=SCRIPTS / "synthesize.py",  # a shell rule's script: declared, so editing it reruns
        head_inputs="results/{model}/synthesis/head_inputs.npz",
        # the offline synthesizer's primitives; the LLM backends need none
        features=lambda w: (
            f"results/{w.model}/synthesis/features.npz"
            if config["synthesis"]["backend"] == "offline"
            else []
        ),
    output:
        directory("results/{model}/synthesis/L{layer}H{head}"),
    params:
        settings=json.dumps(synthesis_settings(config["synthesis"]), sort_keys=True),
        features=lambda w, input: f"--features {input.features}" if input.features else "",
    resources:
        # an open-weights explainer runs a chat model per head (on SLURM: a GPU job)
        gpu=1 if config["synthesis"]["backend"] == "open_weights" else 0,
    log:
        "logs/{model}/synthesize/L{layer}H{head}.log",
    conda:
        CONDA_ENV
    shell:
        "python {input.script} --model {wildcards.model} --layer {wildcards.layer} --head {wildcards.head}"
        " --settings {params.settings:q} --head-inputs {input.head_inputs} {params.features}"
        " --out {output} --log {log}"
