# Synthesis: candidate programs per head. The offline synthesizer (default) fits readable log-linear
# programs to a head's synth-split attention from primitives computed once per model; the LLM backends
# (claude, open_weights) write their candidates in the same format.


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


def synthesize_input(wildcards):
    inputs = {
        "attention": f"results/{wildcards.model}/attention",
        "examples": f"results/{wildcards.model}/data/examples.parquet",
    }
    if config["synthesis"]["backend"] == "offline":
        inputs["features"] = rules.synth_features.output[0].format(model=wildcards.model)
    return inputs


rule synthesize:
    input:
        unpack(synthesize_input),
    output:
        directory("results/{model}/synthesis/L{layer}H{head}"),
    params:
        settings=config["synthesis"],
    log:
        "logs/{model}/synthesize/L{layer}H{head}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/synthesize.py"
