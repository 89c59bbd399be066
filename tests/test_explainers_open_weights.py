"""The open-weights explainer: a Hugging Face chat model generating programs through the same synthesis path.

Fast tests use tiny random-weight Llama models (their replies are noise, so every candidate fails in a
reported way); the slow test uses the real SmolLM2-135M-Instruct with the full prompt.
"""
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch

from attnprog.config import validate_config
from attnprog.contracts import HeadId, SplitExamples
from attnprog.matrices import pack
from attnprog.explainers import ExplainerError, check_backend_ready, synthesize_head_with_llm
from attnprog.explainers.open_weights import OpenWeightsExplainer
from attnprog.explainers.reply import Conversation
from test_explainers_claude import MINIMAL
from test_explainers_synthesis import head_data

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FAILED = {"no_program", "truncated", "syntax_error", "rejected", "runtime_error", "timeout", "memory", "bad_output"}


def synthesis_settings(model_dir, **prompt):
    config = validate_config({**MINIMAL, "synthesis": {
        "backend": "open_weights", "prompt": {"n_examples": 1, "candidates": 1, **prompt},
        "open_weights": {"model": str(model_dir), "max_new_tokens": 16, "device": "cpu"}}})
    return config["synthesis"]


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A 2-layer random Llama with a chat template and room for the whole prompt (16k positions)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tinyworld import make_tokenizer

    folder = tmp_path_factory.mktemp("tiny_chat")
    tokenizer = make_tokenizer(bos=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_chat_model_answers_both_turns_and_its_junk_is_reported(tiny_chat_model, tmp_path):
    attention, examples = head_data()
    settings = synthesis_settings(tiny_chat_model)
    manifest = asdict(synthesize_head_with_llm(examples, attention, settings, tmp_path / "L0H1", "m", HeadId(0, 1),
                                               cache_dir=tmp_path / "cache"))
    assert [r["turn"] for r in manifest["replies"]] == ["first", "refinement"]
    for reply in manifest["replies"]:
        assert reply["input_tokens"] > 1000 and 0 < reply["output_tokens"] <= 16 and reply["cost_usd"] == 0
    assert manifest["replies"][1]["input_tokens"] > manifest["replies"][0]["input_tokens"]  # the conversation grew
    assert {c["status"] for c in manifest["candidates"]} <= FAILED
    assert all(c["origin"] == "open_weights" for c in manifest["candidates"])

    # A rerun is answered from the cache without loading the model.
    explainer = OpenWeightsExplainer(settings["open_weights"], tmp_path / "cache")
    again = asdict(synthesize_head_with_llm(examples, attention, settings, tmp_path / "L0H1", "m", HeadId(0, 1),
                                            explainer=explainer))
    assert explainer._model is None
    assert [r["prompt_hash"] for r in again["replies"]] == [r["prompt_hash"] for r in manifest["replies"]]
    assert all(r["from_cache"] for r in again["replies"])


def test_a_turn_reuses_the_previous_replys_cache_and_answers_the_same(tiny_chat_model, tmp_path):
    """The refinement turn re-sends the first turn: its tokens come from the first reply's key-value cache, and
    greedy decoding gives the same reply as a fresh explainer computing every token."""
    import json

    settings = {**synthesis_settings(tiny_chat_model)["open_weights"], "max_new_tokens": 12}
    first = Conversation("SYSTEM " * 50, [{"role": "user", "content": "first question " * 40}])
    second = Conversation(first.system, first.messages + [{"role": "assistant", "content": "an answer"},
                                                          {"role": "user", "content": "second question"}])
    warm = OpenWeightsExplainer(settings, tmp_path / "warm")
    warm.ask_many([first])
    (reused,) = warm.ask_many([second])
    (fresh,) = OpenWeightsExplainer(settings, tmp_path / "fresh").ask_many([second])
    assert reused.text == fresh.text and reused.output_tokens == fresh.output_tokens > 0
    record = json.loads(next((tmp_path / "warm" / "replies").glob(f"*/{reused.key}.json")).read_text())
    assert 400 < record["prompt_tokens_reused"] < reused.input_tokens and reused.seconds > 0


def test_a_prompt_longer_than_the_model_is_a_failed_candidate_not_a_crash(tiny_models, tmp_path):
    model_dir = tmp_path / "llama"
    shutil.copytree(tiny_models["llama"], model_dir)  # 256 positions: far too few for the prompt
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    attention, examples = head_data()
    manifest = asdict(synthesize_head_with_llm(examples, attention, synthesis_settings(model_dir), tmp_path / "out",
                                               "m", HeadId(0, 0), cache_dir=tmp_path / "cache"))
    (candidate,) = manifest["candidates"]
    assert candidate["status"] == "prompt_too_long" and "256 positions" in candidate["error"]
    assert not (tmp_path / "cache" / "replies").exists()  # failures are not cached: a bigger model retries


def test_a_model_without_chat_template_or_files_is_refused_at_start_up(tiny_models, tiny_chat_model, tmp_path):
    config = {"synthesis": synthesis_settings(tiny_models["gpt2"])}
    with pytest.raises(ExplainerError, match="has no chat template"):
        check_backend_ready(config)
    with pytest.raises(ExplainerError, match="has no chat template"):  # and at the first request
        OpenWeightsExplainer(config["synthesis"]["open_weights"], tmp_path).ask_many(
            [Conversation("system", [{"role": "user", "content": "hi"}])])
    with pytest.raises(ExplainerError, match="'/no/such/model' cannot be loaded"):
        check_backend_ready({"synthesis": synthesis_settings("/no/such/model")})
    check_backend_ready({"synthesis": synthesis_settings(tiny_chat_model)})


def test_a_template_without_system_turns_gets_the_system_prompt_in_the_first_user_turn(tiny_chat_model, tmp_path):
    model_dir = tmp_path / "no_system"
    shutil.copytree(tiny_chat_model, model_dir)
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    from transformers import AutoTokenizer

    settings = synthesis_settings(model_dir)["open_weights"]
    (reply,) = OpenWeightsExplainer(settings, tmp_path / "cache").ask_many(
        [Conversation("SYSTEM TEXT", [{"role": "user", "content": "USER TEXT"}])])
    assert reply.error is None and reply.output_tokens > 0
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    merged = tokenizer.apply_chat_template([{"role": "user", "content": "SYSTEM TEXT\n\nUSER TEXT"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)
    assert reply.input_tokens == len(merged["input_ids"])


def smollm2_head(smollm2_dir, texts: list[str], head: HeadId) -> tuple[SplitExamples, np.ndarray]:
    """The texts as synth examples and one real SmolLM2 head's packed attention on them."""
    from attnprog import data, models

    info = models.describe_model("smollm2-135m", {"local_dir": str(smollm2_dir)})
    tokenizer, model = models.load_tokenizer(info), models.load_model(info, "cpu")
    tokens, attention = [], []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        with torch.inference_mode():
            matrix = model(torch.tensor([ids]), output_attentions=True).attentions[head.layer][0, head.head]
        attention.append(pack(matrix.numpy()))
        tokens.append(data.token_strings(tokenizer, ids))
    return SplitExamples(list(range(len(texts))), tokens, texts), np.concatenate(attention)


@pytest.mark.slow
def test_smollm2_explains_a_real_head_end_to_end(smollm2_dir, tmp_path):
    """SmolLM2-135M-Instruct as the explainer of one of its own heads, with the full prompt: its programs
    are poor, but the reply must be generated, parsed, run in the sandbox and recorded."""
    examples, attention = smollm2_head(smollm2_dir, ["The little cat sat on the warm mat and purred.",
                                                     "Tom ran to the park, and then he played."], HeadId(3, 5))
    settings = synthesis_settings(smollm2_dir, refine=False)
    manifest = asdict(synthesize_head_with_llm(examples, attention, settings, tmp_path / "L3H5", "smollm2-135m", HeadId(3, 5),
                                               cache_dir=tmp_path / "cache"))
    (reply,) = manifest["replies"]
    assert reply["error"] is None and reply["input_tokens"] > 2000 and 0 < reply["output_tokens"] <= 16
    for candidate in manifest["candidates"]:
        assert candidate["status"] in FAILED | {"ok"}
        assert (candidate["synth_jsd"] is not None) == (candidate["status"] == "ok")
        if candidate["file"]:
            assert (tmp_path / "L3H5" / candidate["file"]).is_file()


@pytest.mark.slow
@pytest.mark.jail  # its programs run in the sandbox
def test_a_real_code_model_writes_a_program_that_runs(smollm2_dir, qwen_coder_dir, tmp_path):
    """Qwen2.5-Coder-0.5B-Instruct, fetched and de-quantised as config/llm-0.5b.yaml says, explains a real
    SmolLM2 head: its chat template comes from the GGUF, and at least one program it writes parses, passes the
    jail and runs on every text (greedy decoding: the same reply each time)."""
    examples, attention = smollm2_head(smollm2_dir, ["The little cat sat on the warm mat and purred.",
                                                     "Tom ran to the park, and then he played.",
                                                     "She read the old book twice before bed."], HeadId(5, 3))
    config = validate_config({**MINIMAL, "synthesis": {
        "backend": "open_weights", "prompt": {"n_examples": 2, "candidates": 2, "helper_docs": "signatures",
                                              "refine": False},
        "open_weights": {"model": str(qwen_coder_dir), "max_new_tokens": 400, "device": "cpu", "dtype": "bfloat16"}}})
    manifest = synthesize_head_with_llm(examples, attention, config["synthesis"], tmp_path / "L5H3", "smollm2-135m", HeadId(5, 3),
                                        cache_dir=tmp_path / "cache")
    assert manifest.explainer_model == str(qwen_coder_dir) and manifest.replies[0]["error"] is None
    ran = [c for c in manifest.candidates if c.status == "ok"]
    assert ran, [(c.name, c.status, c.error) for c in manifest.candidates]
    assert all(0 <= c.synth_jsd <= 1 for c in ran)


def test_the_synthesize_rule_dispatches_to_the_llm_backend_and_rerank_reads_its_output(
        tiny_models, tiny_chat_model, tmp_path):
    """attnprog.synthesize.synthesize_head (what the synthesize rule runs) with backend open_weights: only
    synth-split texts reach the prompt, and the rerank stage scores the candidates it wrote."""
    import json

    from attnprog import data, extract, models
    from attnprog.contracts import EXAMPLES, HeadId, RerankResult
    from attnprog.rerank import rerank_head
    from attnprog.synthesize import synthesize_head
    from tinyworld import tiny_config

    config = validate_config(tiny_config({"tiny": tiny_models["gpt2"]}, synthesis={
        "backend": "open_weights", "prompt": {"n_examples": 2, "candidates": 1},
        "open_weights": {"model": str(tiny_chat_model), "max_new_tokens": 8, "device": "cpu",
                         "cache_dir": str(tmp_path / "cache")}}))
    info = models.describe_model("tiny", config["models"]["tiny"])
    tokenizer = models.load_tokenizer(info)
    examples, _ = data.build_corpus(config["corpus"], tokenizer)
    EXAMPLES.write(examples, tmp_path / "examples.parquet")
    extract.extract_attention(models.load_model(info, "cpu"), examples, tmp_path / "attention", batch_size=4,
                              pad_id=tokenizer.pad_token_id, progress=False)

    head_inputs = tmp_path / "head_inputs.npz"
    extract.write_head_inputs(tmp_path / "attention", tmp_path / "examples.parquet", head_inputs)
    out = tmp_path / "synthesis" / "L1H2"
    manifest = asdict(synthesize_head(config["synthesis"], "tiny", HeadId(1, 2), head_inputs, out))
    assert manifest["backend"] == "open_weights" and json.loads((out / "manifest.json").read_text()) == manifest
    record = json.loads(next((tmp_path / "cache" / "replies").glob("*/*.json")).read_text())
    first_turn = record["request"]["messages"][1]["content"]  # [0] is the system prompt

    def shown(split_is_synth):
        rows = examples[(examples["split"] == "synth") == split_is_synth]
        return sum("Tokens: " + " ".join(f"[{i}]{t!r}" for i, t in enumerate(tokens)) + "\n" in first_turn
                   for tokens in rows["tokens"])

    assert shown(True) == 2 and shown(False) == 0

    scores = rerank_head(out, head_inputs, HeadId(1, 2), tmp_path / "L1H2.npz").scores
    assert [s.name for s in scores] == [c["name"] for c in manifest["candidates"]]
    assert all(s.val_iou == 0 for s in scores if s.status != "ok")
