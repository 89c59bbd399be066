# Config validation and the helper functions every rule file uses.
import json
import os
import re
import sys
from pathlib import Path

from attnprog.config import ConfigError, validate_config

try:
    config.update(validate_config(config, Path(workflow.basedir) / "workflow/schemas/config.schema.yaml"))
except ConfigError as error:
    sys.exit(f"error: {error}")

if config["offline"]:
    # Jobs (local or SLURM) inherit the environment, so the whole run stays off the Hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"

MODELS = list(config["models"])


wildcard_constraints:
    model="|".join(re.escape(m) for m in MODELS),
    layer=r"\d+",
    head=r"\d+",


def model_spec(wildcards):
    return config["models"][wildcards.model]


def batch_size(wildcards):
    return model_spec(wildcards).get("batch_size", config["extract"]["batch_size"])


def model_info(model):
    """The facts about a model written by the checkpoint `model_info` (layers, heads, load path)."""
    with open(checkpoints.model_info.get(model=model).output[0]) as f:
        return json.load(f)


def heads_of(model):
    """Every (layer, head) of a model; known once its checkpoint `model_info` has run."""
    info = model_info(model)
    return [(layer, head) for layer in range(info["n_layers"]) for head in range(info["n_heads"])]


def final_targets():
    """What `rule all` builds; grows as stages are added."""
    return expand("results/{model}/attention", model=MODELS)
