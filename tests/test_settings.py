"""Each stage's settings record: built from the validated config only (a missing key is an error, not a default
of the code's own), and its defaults are the schema's."""
import dataclasses
from dataclasses import asdict, fields

import pytest

from attnprog.config import REPO_CONFIGS, ConfigError, load_config, schema_defaults
from attnprog.contracts import HeadId
from attnprog.settings import (LibrarySettings, LLMSampleSettings, OfflineSynthesisSettings, QASettings,
                               ReportSettings, SubstitutionSettings, TuningSettings)

RECORDS = [OfflineSynthesisSettings, LLMSampleSettings, LibrarySettings, TuningSettings, SubstitutionSettings,
           QASettings, ReportSettings]
# Keys of a section that its record leaves to other readers (the qa rule keeps them out of the job's params).
NOT_IN_RECORD = {QASettings: {"tasks", "include_path", "seed"}}


def section(record, config=None) -> dict:
    config = config or {name: schema_defaults(name) for name in ("synthesis", "library", "substitution", "qa",
                                                                  "report")}
    out = config[record.SECTION[0]]
    for key in record.SECTION[1:]:
        out = out[key]
    return out


def plain(value):
    """A record's value as the config holds it (tuples as lists, nested records as dicts)."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.__name__)
def test_defaults_are_the_schemas_defaults(record):
    defaults = section(record)
    assert set(defaults) - NOT_IN_RECORD.get(record, set()) == {f.name for f in fields(record)}
    assert plain(asdict(record.defaults())) == {k: v for k, v in defaults.items() if k in asdict(record.defaults())}


def test_defaults_take_changes():
    settings = SubstitutionSettings.defaults(fractions=[0, 0.5], batch_size=2)
    assert settings.fractions == (0, 0.5) and settings.batch_size == 2
    assert settings.tuning == TuningSettings.defaults()


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.__name__)
def test_from_config_rejects_a_missing_key(record):
    given = dict(section(record))
    missing = fields(record)[-1].name
    del given[missing]
    with pytest.raises(ConfigError, match=rf"config: {'.'.join(record.SECTION)}\.{missing}: missing"):
        record.from_config(given)


def test_a_missing_key_of_a_nested_section_is_named():
    given = {**section(SubstitutionSettings), "tuning": {"epochs": 1}}
    with pytest.raises(ConfigError, match=r"config: substitution\.tuning\.learning_rate: missing"):
        SubstitutionSettings.from_config(given)


def test_the_repositorys_config_builds_every_record():
    """What the rules pass (the validated config's sections, the qa rule's without its task list) builds."""
    config = load_config(REPO_CONFIGS[0])
    for record in RECORDS:
        assert record.from_config(section(record, config))
    job = {k: v for k, v in config["qa"].items() if k not in NOT_IN_RECORD[QASettings]}
    assert QASettings.from_config(job).fractions == tuple(config["qa"]["fractions"])


def test_the_llm_sample_is_seeded_per_layer_and_off_by_default():
    assert LLMSampleSettings.defaults().sample(30, 9) == []  # backend null: off
    sample = LLMSampleSettings.defaults(backend="open_weights")
    heads = sample.sample(30, 9)
    assert len(heads) == 60 and heads == sample.sample(30, 9)
    assert all(sum(h.layer == layer for h in heads) == 2 for layer in range(30))
    assert len(set(heads)) == 60 and all(0 <= h.head < 9 for h in heads)
    # sampling fewer layers leaves each sampled layer's heads as they were; another seed draws others
    few = dataclasses.replace(sample, layers=(29, 3)).sample(30, 9)
    assert few == [h for h in heads if h.layer in (3, 29)]
    assert dataclasses.replace(sample, seed=1).sample(30, 9) != heads
    assert dataclasses.replace(sample, heads_per_layer=20).sample(2, 4) == [HeadId(l, h) for l in range(2)
                                                                            for h in range(4)]


def test_an_llm_sample_of_a_layer_the_model_lacks_is_one_line():
    sample = LLMSampleSettings.defaults(backend="claude", layers=(0, 30))
    with pytest.raises(ConfigError, match=r"^config: synthesis.llm.layers: the model has 30 layers, no layer 30$"):
        sample.sample(30, 9)
