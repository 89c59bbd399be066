"""Proofs that substitution replaces attention probabilities at the right place, and tests of the sweep."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from attnprog import substitute
from attnprog.contracts import BEST, ORDERS, SINGLE_HEADS, ContractError, SubstitutionSummary
from attnprog.settings import SubstitutionSettings
from attnprog.contracts import PROGRAMS as PROGRAMS_TABLE
from attnprog.substitute import orders
from attnprog.substitute import sweep as sweeps

VOCAB = 64
SLIDING_WINDOW = 4  # the tiny Gemma-3's layer 0: key j is visible to query i when i - j < 4


def tiny_model(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    elif arch == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             hidden_size=32, intermediate_size=64, vocab_size=VOCAB))
    elif arch == "qwen2":  # Qwen2.5's attention: biases on the query, key and value projections, and GQA
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             hidden_size=32, intermediate_size=64, vocab_size=VOCAB))
    else:  # Gemma-3-270M's attention in small: one key/value head shared by 4 query heads, query/key norms,
        # scaling by query_pre_attn_scalar (not the head size), a sliding-window layer (a window shorter than
        # the tests' sequences) and a global one; softcapping on (Gemma-2 style) so that path is exercised too.
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, hidden_size=32, head_dim=8,
            intermediate_size=64, vocab_size=VOCAB, sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=20,
            attn_logit_softcapping=2.0, layer_types=["sliding_attention", "full_attention"]))
    model.set_attn_implementation("eager")
    return model.eval()


def id_strings(ids):
    """Token strings for the tiny models (their vocabularies are just numbers)."""
    return [f"t{i}" for i in ids]


def ids_of(tokens):
    return tuple(int(t[1:]) for t in tokens)


def record_attention(model, ids: torch.Tensor) -> dict:
    """Every head's eager attention per example, keyed by (layer, head, token ids)."""
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    return {(layer, head, tuple(ids[b].tolist())): a[b, head].numpy()
            for layer, a in enumerate(attentions) for b in range(ids.shape[0]) for head in range(a.shape[1])}


def all_heads(model):
    return [(layer, head) for layer in range(model.config.num_hidden_layers)
            for head in range(model.config.num_attention_heads)]


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


ARCHS = ["gpt2", "llama", "gemma3", "qwen2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_replacing_no_heads_gives_the_original_logits(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    expected = logits(model, ids)
    substitute.install(model, id_strings)
    assert torch.equal(logits(model, ids), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_replacing_every_head_by_its_own_attention_gives_the_original_logits(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    expected, recorded = logits(model, ids), record_attention(model, ids)
    replacer = substitute.install(model, id_strings)
    replacer.set_heads({(layer, head): (lambda tokens, l=layer, h=head: recorded[(l, h, ids_of(tokens))])
                        for layer, head in all_heads(model)})
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    # ... while another matrix on one head does change them: the replacement really is used.
    replacer.set_heads({(1, 0): substitute.uniform_attention})
    assert not torch.allclose(logits(model, ids), expected, atol=1e-4)


def test_replacement_goes_in_before_the_value_mix():
    """Layer 0's attention output, rebuilt by hand: each head's matrix times its (GQA-shared) values, then the
    output projection; head 3 with the uniform matrix, the others with their own recorded attention."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    recorded = record_attention(model, ids)
    attn, seen = model.model.layers[0].self_attn, {}
    attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(hidden=kwargs["hidden_states"], out=out[0]),
                               with_kwargs=True)
    replacer = substitute.install(model, id_strings)
    replacer.set_heads({(0, 3): substitute.uniform_attention})
    logits(model, ids)
    with torch.no_grad():
        values = attn.v_proj(seen["hidden"]).view(1, 7, 2, 8).transpose(1, 2)  # 2 key/value heads of size 8
        matrices = [torch.from_numpy(recorded[(0, h, tuple(ids[0].tolist()))]) for h in range(3)]
        matrices.append(torch.from_numpy(substitute.uniform_attention(["x"] * 7)))
        expected = attn.o_proj(torch.cat([m @ values[0, h // 2] for h, m in enumerate(matrices)], dim=-1))
    torch.testing.assert_close(seen["out"][0], expected, atol=1e-5, rtol=1e-5)


def leaky_matrix(tokens):
    """Every token attends to every token, later ones included: a program that ignores causality."""
    n = len(tokens)
    return np.ones((n, n), dtype=np.float32)


@pytest.mark.parametrize("arch", ARCHS)
def test_matrix_entries_above_the_diagonal_never_reach_the_model(arch):
    model = tiny_model(arch)
    replacer = substitute.install(model, id_strings)
    replacer.set_heads({(0, 0): leaky_matrix, (1, 1): leaky_matrix})
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % VOCAB
    torch.testing.assert_close(logits(model, ids)[0, :6], logits(model, changed)[0, :6])
    # ... and what is left is the uniform matrix, as masking and row-normalising an all-ones matrix gives.
    replacer.set_heads({(0, 0): substitute.uniform_attention, (1, 1): substitute.uniform_attention})
    uniform = logits(model, ids)
    replacer.set_heads({(0, 0): leaky_matrix, (1, 1): leaky_matrix})
    if arch != "gemma3":  # layer 0 of the Gemma model is a sliding window, where the two differ
        torch.testing.assert_close(logits(model, ids), uniform)


def first_token(tokens):
    n = len(tokens)
    matrix = np.zeros((n, n), dtype=np.float32)
    matrix[:, 0] = 1.0
    return matrix


def test_a_sliding_window_layer_masks_the_program_by_its_window():
    """A program's matrix is cut to the layer's window before it is used (then row-normalised; a row left empty
    attends to its first visible key), while a global layer uses it whole. The model returns the
    probabilities it used as its attentions."""
    model = tiny_model("gemma3")
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    replacer = substitute.install(model, id_strings)
    replacer.set_heads({(0, 2): first_token, (1, 2): first_token})
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        used = model(ids, output_attentions=True).attentions
    rows, cols = np.indices((12, 12))
    window = SLIDING_WINDOW
    expected_sliding = ((cols == np.maximum(rows - window + 1, 0)) & (cols <= rows)).astype(np.float32)
    for b in range(2):
        np.testing.assert_array_equal(used[0][b, 2].numpy(), expected_sliding)
        np.testing.assert_array_equal(used[1][b, 2].numpy(), first_token(["x"] * 12))
        # the model's own heads of the sliding layer respect the same window
        assert float(used[0][b, 0].numpy()[rows - cols >= window].max()) == 0.0


def first_token_or_nothing(tokens):
    """Attends to the previous token only where it repeats; other rows are all zero."""
    n = len(tokens)
    matrix = np.zeros((n, n), dtype=np.float32)
    for i in range(1, n):
        if tokens[i] == tokens[i - 1]:
            matrix[i, i - 1] = 1.0
    return matrix


def test_all_zero_rows_attend_to_the_first_token():
    model = tiny_model("llama")
    replacer = substitute.install(model, id_strings)
    ids = torch.tensor([[5, 5, 9, 3, 3, 7]])
    first = lambda tokens: np.eye(len(tokens), dtype=np.float32)[[0] * len(tokens)]  # noqa: E731
    first_or_repeat = lambda tokens: first(tokens) * 0 + first_token_or_nothing(tokens)  # noqa: E731
    expected_matrix = first(["x"] * 6)
    expected_matrix[1] = [1, 0, 0, 0, 0, 0]  # token 1 repeats token 0: attends to 0 anyway
    expected_matrix[4] = [0, 0, 0, 1, 0, 0]  # token 4 repeats token 3
    replacer.set_heads({(1, 2): lambda tokens: expected_matrix})
    expected = logits(model, ids)
    replacer.set_heads({(1, 2): first_or_repeat})
    torch.testing.assert_close(logits(model, ids), expected)


def token_dependent(tokens):
    """A program whose matrix depends on the token strings: attend to earlier tokens with an even id."""
    n = len(tokens)
    even = np.array([int(t[1:]) % 2 == 0 for t in tokens], dtype=np.float32)
    return np.tril(np.ones((n, n), dtype=np.float32)) * even[None, :]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_give_the_same_per_example_results(arch, side):
    model = tiny_model(arch)
    replacer = substitute.install(model, id_strings)
    replacer.set_heads({(0, 1): token_dependent, (1, 0): substitute.uniform_attention})
    gen = torch.Generator().manual_seed(5)
    examples = [torch.randint(1, VOCAB, (n,), generator=gen) for n in (9, 5, 7)]
    alone = [logits(model, ids[None])[0] for ids in examples]
    length = max(len(e) for e in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, e in enumerate(examples):
        span = slice(0, len(e)) if side == "right" else slice(length - len(e), length)
        ids[b, span], mask[b, span] = e, 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: real tokens keep positions 0..n-1
    batched = logits(model, ids, attention_mask=mask, position_ids=position_ids)
    for b, e in enumerate(examples):
        span = slice(0, len(e)) if side == "right" else slice(length - len(e), length)
        torch.testing.assert_close(batched[b, span], alone[b], atol=1e-5, rtol=1e-5)


def test_cached_decoding_is_refused_with_a_clear_error():
    model = tiny_model("llama")
    replacer = substitute.install(model, id_strings)
    replacer.set_heads({(0, 0): substitute.uniform_attention})
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        past = model(ids[:, :5], use_cache=True).past_key_values
        with pytest.raises(RuntimeError, match="whole-sequence"):
            model(ids[:, 5:], past_key_values=past, use_cache=True)


def test_a_replacement_of_the_wrong_shape_is_refused():
    model = tiny_model("gpt2")
    replacer = substitute.install(model, id_strings)
    replacer.set_heads({(0, 0): lambda tokens: np.eye(3)})
    with pytest.raises(ValueError, match="L0H0 returned shape"):
        logits(model, torch.randint(0, VOCAB, (1, 6)))


# --- the sweep -------------------------------------------------------------------------------------------------

def own_perplexity(model, sequences) -> float:
    """Token-level perplexity from the model's own loss, each sequence alone (no batching, no padding)."""
    total, tokens = 0.0, 0
    for seq in sequences:
        ids = torch.tensor([seq])
        with torch.no_grad():
            total += model(ids, labels=ids).loss.item() * (len(seq) - 1)
        tokens += len(seq) - 1
    return float(np.exp(total / tokens))


def test_score_runs_unmodified_nll_matches_the_models_own_loss():
    model = tiny_model("llama")
    replacer = substitute.install(model, id_strings)
    gen = torch.Generator().manual_seed(6)
    sequences = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (8, 3, 11)]
    scores, _ = sweeps.score_runs(model, replacer, {}, sequences, batch_size=2)
    base = scores[sweeps.UNMODIFIED]
    for seq, total, n in zip(sequences, base.nll, base.count):
        ids = torch.tensor([seq])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        assert n == len(seq) - 1
        assert total / n == pytest.approx(loss, rel=1e-5)
    assert (base.kl == 0).all()


def test_plan_sweep_replaces_the_best_heads_first_and_random_orders_differ():
    ranked = [(0, 2), (1, 0), (0, 1), (1, 1), (0, 0)]
    chosen = {("programs", None): ranked, **{("random", s): orders.random_order(ranked, s) for s in (0, 1)}}
    runs = sweeps.plan_sweep(chosen, n_heads_total=6, fractions=[0.0, 0.5, 1.0])
    by = {(r.method, r.seed, r.fraction): r for r in runs}
    assert by[("programs", None, 0.5)].heads == ((0, 2), (1, 0), (0, 1))
    assert by[("uniform", None, 0.5)].heads == by[("programs", None, 0.5)].heads
    assert by[("programs", None, 1.0)].heads == tuple(ranked)  # 6 asked, only 5 have a program
    assert {by[("random", s, 0.5)].heads for s in (0, 1)} != {by[("programs", None, 0.5)].heads}
    assert by[("random", 0, 1.0)].key == by[("programs", None, 1.0)].key  # the same heads: computed once
    assert by[("uniform", None, 0.0)].key == by[("programs", None, 0.0)].key != by[("uniform", None, 1.0)].key


def test_run_sweep_reports_zero_increase_for_the_baseline_and_a_real_one_for_uniform():
    model = tiny_model("llama")
    replacer = substitute.install(model, id_strings)
    gen = torch.Generator().manual_seed(7)
    sets = {"test": [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (9, 12, 6, 10)]}
    heads = all_heads(model)
    programs = {head: token_dependent for head in heads}
    runs = sweeps.plan_sweep({("programs", None): heads, ("random", 0): orders.random_order(heads, 0)}, len(heads),
                             [0.0, 1.0])
    table = sweeps.run_sweep(model, replacer, runs, programs, sets, batch_size=3, n_boot=200, log=lambda m: None)
    base = table[table.fraction == 0.0]
    assert (base.rel_increase == 0).all() and (base.rel_lo == 0).all() and (base.rel_hi == 0).all()
    full = table[(table.fraction == 1.0)].set_index("method")
    assert full.loc["uniform", "rel_increase"] != 0
    for _, row in table.iterrows():
        assert row.ppl_lo <= row.ppl <= row.ppl_hi
        assert row.rel_lo <= row.rel_increase <= row.rel_hi
    assert replacer.heads == {}  # the model is left unmodified
    assert set(table.columns) >= {"method", "seed", "fraction", "n_replaced", "split", "ppl", "rel_increase", "kl"}
    assert isinstance(table, pd.DataFrame)


def test_token_kl_is_the_kl_of_the_two_next_token_distributions():
    """Checked against torch.distributions' own KL of categorical distributions (an independent formula),
    including its direction: KL(before || after), weighted by the unmodified model's probabilities."""
    gen = torch.Generator().manual_seed(9)
    before = torch.log_softmax(torch.randn(2, 5, 11, generator=gen) * 3, -1)
    after = torch.log_softmax(torch.randn(2, 5, 11, generator=gen) * 3, -1)
    expected = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=before),
                                                 torch.distributions.Categorical(logits=after))
    assert torch.allclose(sweeps.token_kl(before, after), expected, atol=1e-6)
    assert not torch.allclose(sweeps.token_kl(after, before), expected, atol=1e-3)
    assert torch.equal(sweeps.token_kl(before, before), torch.zeros(2, 5))


def test_run_sweep_scores_each_run_as_the_model_computes_it_with_its_kl_to_the_unmodified_model():
    """The sweep compares every run with the unmodified model batch by batch; each run's perplexity must be
    what the model gives with those heads set, and its KL what tuning's (separately written) KL gives."""
    from attnprog.substitute.tuning import reference_log_probs, substituted_kl

    model = tiny_model("llama")
    replacer = substitute.install(model, id_strings)
    gen = torch.Generator().manual_seed(8)
    sequences = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (9, 12, 6, 10, 7)]
    heads = all_heads(model)
    programs = {head: token_dependent for head in heads}
    runs = sweeps.plan_sweep({("programs", None): heads}, len(heads), [0.0, 0.5, 1.0])
    table = sweeps.run_sweep(model, replacer, runs, programs, {"val": sequences}, batch_size=2, n_boot=200,
                             log=lambda m: None).set_index(["method", "fraction"])
    reference = reference_log_probs(model, replacer, sequences, 3)
    assert table.loc[("programs", 0.0), "kl"] == 0 == table.loc[("programs", 0.0), "kl_hi"]
    for run in runs:
        chosen = {head: substitute.uniform_attention if run.method == "uniform" else programs[head]
                  for head in run.heads}
        replacer.set_heads(chosen)
        expected_ppl = own_perplexity(model, sequences)
        total, tokens = substituted_kl(model, replacer, chosen, reference)
        row = table.loc[(run.method, run.fraction)]
        assert row.ppl == pytest.approx(expected_ppl, rel=1e-5)
        assert row.kl == pytest.approx(total / tokens, rel=1e-4, abs=1e-7)
        assert row.kl_lo <= row.kl <= row.kl_hi
        if run.heads:
            assert row.kl > 0
    assert replacer.heads == {}


def test_single_head_costs_score_each_head_alone_as_the_model_computes_it():
    from attnprog.substitute.tuning import reference_log_probs, substituted_kl

    model = tiny_model("llama")
    replacer = substitute.install(model, id_strings)
    gen = torch.Generator().manual_seed(10)
    sequences = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (9, 12, 6, 10)]
    heads = [(0, 1), (1, 3), (1, 0)]
    programs = {head: token_dependent for head in heads}
    estimates = dict(zip(heads, [0.1, 0.2, 0.3]))
    table = sweeps.single_head_costs(model, replacer, heads, programs, sequences, 3, estimates, log=lambda m: None)
    assert list(zip(table["layer"], table["head"])) == heads and list(table.estimated_kl) == [0.1, 0.2, 0.3]
    base = own_perplexity(model, sequences)
    reference = reference_log_probs(model, replacer, sequences, 2)
    for row in table.itertuples():
        replacer.set_heads({(row.layer, row.head): programs[(row.layer, row.head)]})
        ppl = own_perplexity(model, sequences)
        total, tokens = substituted_kl(model, replacer, {(row.layer, row.head): token_dependent}, reference)
        assert row.ppl == pytest.approx(ppl, rel=1e-5) and row.rel_increase == pytest.approx(ppl / base - 1, abs=1e-5)
        assert row.kl == pytest.approx(total / tokens, rel=1e-4) and row.kl > 0
    assert replacer.heads == {}
    assert sweeps.single_head_costs(model, replacer, heads, programs, sequences, 3, log=lambda m: None
                                    ).estimated_kl.isna().all()


def test_the_summary_ranks_the_attribution_estimate_against_the_measured_kl_not_the_perplexity():
    """Crafted so that each pairing has its own sign: estimate vs KL +1, estimate vs perplexity -1, IoU vs KL -1,
    IoU vs perplexity +1."""
    sweep = pd.DataFrame([{"method": "programs", "seed": None, "fraction": f, "n_replaced": 4 * f, "split": "heldout",
                           "n_tokens": 100, "ppl": 10.0 + f, "ppl_lo": 9.0, "ppl_hi": 12.0, "rel_increase": f / 10,
                           "rel_lo": 0.0, "rel_hi": f / 5, "kl": f, "kl_lo": 0.0, "kl_hi": 2 * f} for f in (0.0, 1.0)])
    single = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "ppl": [11.0, 12.0, 13.0, 14.0],
                           "rel_increase": [0.1, 0.2, 0.3, 0.4], "kl": [0.4, 0.3, 0.2, 0.1],
                           "estimated_kl": [0.5, 0.35, 0.25, 0.0]})
    best = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "val_iou": 0.5,
                         "test_iou": [0.2, 0.4, 0.6, 0.8]})
    stats = sweeps.summarise_sweep(sweep, single, best, "m", "heldout").single_head
    assert stats.spearman_rho == pytest.approx(1) and stats.iou_kl["spearman_rho"] == pytest.approx(-1)
    assert stats.estimated_kl["spearman_rho"] == pytest.approx(1)
    without = sweeps.summarise_sweep(sweep, single.assign(estimated_kl=np.nan), best, "m", "heldout").single_head
    assert without.estimated_kl is None


# --- programs from a library -----------------------------------------------------------------------------------

PROGRAMS = {
    "previous_token": ('"""Each token attends to the token before it."""\nimport numpy as np\n\n\n'
                       'def attention(tokens):\n    n = len(tokens)\n    m = np.zeros((n, n))\n'
                       '    m[np.arange(1, n), np.arange(n - 1)] = 1\n    m[0, 0] = 1\n    return m\n'),
    "first_token": ('"""Every token attends to the first token."""\nimport numpy as np\n\n\n'
                    'def attention(tokens):\n    m = np.zeros((len(tokens), len(tokens)))\n    m[:, 0] = 1\n'
                    '    return m\n'),
    # Not causal: every row attends to the sentence's last token, which later tokens change.
    "last_token": ('"""Every token attends to the last token of the sentence."""\nimport numpy as np\n\n\n'
                   'def attention(tokens):\n    m = np.zeros((len(tokens), len(tokens)))\n    m[:, -1] = 1\n'
                   '    return m\n'),
}


def make_library(folder, heads: dict, causal: dict | None = None) -> substitute.LibraryFiles:
    """A library as the library rule writes it: programs/*.py, programs.parquet and best.parquet.
    `heads` maps (layer, head) -> (program name, val IoU)."""
    causal = causal or {}
    (folder / "programs").mkdir(parents=True)
    for name, source in PROGRAMS.items():
        (folder / "programs" / f"{name}.py").write_text(source)
    PROGRAMS_TABLE.write([{"name": name, "origin": "offline", "source_layer": 0, "source_head": 0,
                           "description": source.splitlines()[0].strip('"'), "category": "position",
                           "causal": causal.get(name, name != "last_token"), "trusted": True, "n_terms": 1,
                           "source_chars": len(source), "in_library": True, "library_rank": k}
                          for k, (name, source) in enumerate(PROGRAMS.items())], folder / "programs.parquet")
    BEST.write([{"layer": layer, "head": head, "program": name, "val_iou": iou, "test_iou": iou - 0.01,
                 "synth_iou": iou, "causal": causal.get(name, name != "last_token"),
                 **{f"{s}_output_error": None for s in ("synth", "val", "test")}}
                for (layer, head), (name, iou) in heads.items()], folder / "best.parquet")
    return substitute.LibraryFiles(best=folder / "best.parquet", programs=folder / "programs.parquet",
                                   program_dir=folder / "programs")


def test_library_programs_replace_heads_and_non_causal_ones_never_see_later_tokens(tmp_path):
    model = tiny_model("llama")
    library = make_library(tmp_path / "library", {(0, 0): ("previous_token", 0.9), (0, 1): ("last_token", 0.8),
                                                  (1, 2): ("first_token", 0.7)})
    best = substitute.read_best(library.best)
    assert [(r.layer, r.head) for r in best.itertuples()] == [(0, 0), (0, 1), (1, 2)]
    programs = substitute.program_replacements(library.program_dir, library.programs, best, log=lambda m: None)
    assert programs[(0, 1)].runner.prefixwise and not programs[(0, 0)].runner.prefixwise
    replacer = substitute.install(model, id_strings)
    replacer.set_heads(programs)
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(8))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % VOCAB
    torch.testing.assert_close(logits(model, ids)[0, :6], logits(model, changed)[0, :6])
    # Run prefix by prefix, "attend to the last token" becomes "attend to yourself": row i of tokens[:i+1].
    replacer.set_heads({(0, 1): lambda tokens: np.eye(len(tokens))})
    itself = logits(model, ids)
    replacer.set_heads({(0, 1): programs[(0, 1)]})
    torch.testing.assert_close(logits(model, ids), itself)
    # With noncausal="skip" the head is left alone.
    skipped = substitute.program_replacements(library.program_dir, library.programs, best, noncausal="skip", log=lambda m: None)
    assert set(skipped) == {(0, 0), (1, 2)}


def test_a_program_that_fails_on_an_example_falls_back_to_uniform_and_is_counted(tmp_path):
    library = make_library(tmp_path / "library", {(0, 0): ("previous_token", 0.9)})
    (library.program_dir / "previous_token.py").write_text(
        '"""Fails on long inputs."""\nimport numpy as np\n\n\ndef attention(tokens):\n'
        '    if len(tokens) > 5:\n        raise ValueError("too long")\n    return np.eye(len(tokens))\n')
    programs = substitute.program_replacements(library.program_dir, library.programs,
                                               substitute.read_best(library.best), log=lambda m: None)
    runner = programs[(0, 0)]
    out = runner.many([["a", "b"], list("abcdefg")])
    np.testing.assert_allclose(out[0], np.eye(2))
    np.testing.assert_allclose(out[1], substitute.uniform_attention(list("abcdefg")))
    assert runner.failures == 1


def test_substitution_sweep_writes_the_sweep_and_summary(tiny_models, tmp_path):
    from attnprog import data, models
    from tinyworld import tiny_config

    info = models.describe_model("tiny", {"local_dir": str(tiny_models["llama"])})
    corpus = {**tiny_config({})["corpus"], "max_tokens": 96}
    examples, heldout = data.build_corpus(corpus, models.load_tokenizer(info))
    examples.to_parquet(tmp_path / "examples.parquet")
    heldout.to_parquet(tmp_path / "heldout.parquet")
    names = ["previous_token", "first_token", "last_token"]
    library = make_library(tmp_path / "library", {(layer, head): (names[(layer + head) % 3], 0.9 - 0.1 * head)
                                                  for layer in range(2) for head in range(4)})
    settings = SubstitutionSettings.defaults(
        fractions=(0, 0.25, 1.0), methods=("programs", "attribution", "uniform", "random"), random_seeds=(0, 1),
        heldout_tokens=200, batch_size=4, bootstrap=100, single_head_count=4, single_head_split="test",
        noncausal="prefixwise", attribution_samples=2)
    out = tmp_path / "substitution"
    summary = substitute.substitution_sweep(info, library, tmp_path / "examples.parquet",
                                            tmp_path / "heldout.parquet", settings, out / "sweep.parquet",
                                            out / "single_heads.parquet", out / "orders.parquet",
                                            out / "summary.json", "cpu", log=lambda m: None)
    sweep = pd.read_parquet(out / "sweep.parquet")
    assert set(sweep.split) == {"val", "test", "heldout"}
    assert len(sweep) == 3 * 3 * 5  # splits x fractions x (programs, attribution, uniform, 2 random orders)
    heads = {(layer, head) for layer in range(2) for head in range(4)}
    table = ORDERS.read(out / "orders.parquet")
    for (method, seed), order in table.groupby(["method", "seed"], dropna=False):
        assert list(order["rank"]) == list(range(8)) and set(zip(order["layer"], order["head"])) == heads, method
    assert set(table.method) == {"programs", "attribution", "random"}
    headline = summary.best.method
    assert set(table[table.headline].method) == {headline} and headline in ("programs", "attribution")
    assert substitute.read_headline_order(out / "orders.parquet")[0] == headline
    attribution = table[table.method == "attribution"].sort_values("rank")
    assert orders.read_order(out / "orders.parquet", "attribution") == list(zip(attribution["layer"], attribution["head"]))
    with pytest.raises(ContractError, match="more than one random order"):  # one per seed: which would it be?
        orders.read_order(out / "orders.parquet", "random")
    assert 200 <= sweep[sweep.split == "heldout"].n_tokens.max() < 200 + corpus["max_tokens"]
    assert summary.split == "heldout" and summary.baseline_ppl > 1
    for method in ("programs", "uniform", "random"):
        curve = summary.rel_increase(method)
        assert set(curve) == {"0", "0.25", "1"} and curve["0"] == 0
    assert summary.n_replaced == {"0": 0, "0.25": 2, "1": 8}
    # all heads: the order no longer matters
    assert summary.rel_increase("programs")["1"] == summary.rel_increase("random")["1"]
    assert summary.best.chosen_on == "val"
    assert summary.single_head.n_heads == 4 and -1 <= summary.single_head.spearman_rho <= 1
    assert -1 <= summary.single_head.estimated_kl["spearman_rho"] <= 1
    assert -1 <= summary.single_head.iou_kl["spearman_rho"] <= 1
    single = SINGLE_HEADS.read(out / "single_heads.parquet")
    assert len(single) == 4 and (single.kl >= 0).all() and single.estimated_kl.notna().all()
    written = json.loads((out / "summary.json").read_text())
    assert SubstitutionSummary.read(out / "summary.json") == summary
    assert written["programs"] == summary.rel_increase("programs")  # the main split's curves also at the top level
    heldout = sweep[sweep.split == "heldout"]
    for method in ("programs", "uniform", "random"):  # the KL per fraction as the sweep measured it (random: mean)
        rows = heldout[heldout.method == method].groupby("fraction")
        assert written["kl"][method] == {f"{f:g}": pytest.approx(r.kl.mean()) for f, r in rows}
    assert "random" not in written["kl_interval"]
    assert written["kl_interval"]["uniform"]["1"] == pytest.approx(
        heldout[(heldout.method == "uniform") & (heldout.fraction == 1)][["kl_lo", "kl_hi"]].iloc[0].tolist())


@pytest.mark.slow
def test_real_smollm2_every_head_replaced_by_its_own_attention_keeps_its_logits(smollm2_dir):
    """SmolLM2-135M (30 layers x 9 heads sharing 3 key/value heads): all 270 heads replaced by their own
    recorded attention, in a padded batch of two texts, give the model's own logits."""
    from functools import partial

    from attnprog import data, models

    info = models.describe_model("smollm2", {"local_dir": str(smollm2_dir)})
    tokenizer, model = models.load_tokenizer(info), models.load_model(info, "cpu")
    texts = ["The cat sat on the mat because it was warm.", "Tracy didn't go home that evening."]
    examples = [tokenizer(text)["input_ids"] for text in texts]
    expected = [logits(model, torch.tensor([ids]))[0] for ids in examples]
    recorded = {}
    for ids in examples:
        recorded.update(record_attention(model, torch.tensor([ids])))
    by_tokens = {tuple(data.token_strings(tokenizer, ids)): tuple(ids) for ids in examples}
    replacer = substitute.install(model, partial(data.token_strings, tokenizer))
    replacer.set_heads({(layer, head): (lambda tokens, l=layer, h=head: recorded[(l, h, by_tokens[tuple(tokens)])])
                        for layer, head in all_heads(model)})
    length = max(map(len, examples))
    ids = torch.full((2, length), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for b, seq in enumerate(examples):
        ids[b, : len(seq)], mask[b, : len(seq)] = torch.tensor(seq), 1
    batched = logits(model, ids, attention_mask=mask)
    for b, seq in enumerate(examples):
        torch.testing.assert_close(batched[b, : len(seq)], expected[b], atol=2e-4, rtol=1e-4)


def test_the_headline_method_is_chosen_on_val_among_non_baselines():
    rows = []
    for method, val_cost, heldout_cost in (("programs", 0.3, 0.1), ("better", 0.1, 0.4), ("random", 0.0, 0.0),
                                           ("uniform", 0.0, 0.0)):
        for fraction in (0.0, 0.25, 0.5, 1.0):
            for split, cost in (("val", val_cost), ("heldout", heldout_cost)):
                rows.append({"method": method, "split": split, "fraction": fraction,
                             "rel_increase": 0.0 if fraction == 0 else cost * fraction})
    sweep = pd.DataFrame(rows)
    # "better" costs less on val (whatever held-out text says: it is only reported); baselines never headline
    assert sweeps.choose_headline(sweep) == "better"
    assert sweeps.choose_headline(sweep[sweep.method != "better"]) == "programs"
