"""The attribution order: its KL estimate against the exact KL, and the greedy order it builds."""
import numpy as np
import pytest
import torch

from attnprog import substitute
from attnprog.substitute.attribution import attribution_order, estimated_kl
from transformers import LlamaConfig, LlamaForCausalLM

from test_substitute import VOCAB, all_heads, id_strings, ids_of, record_attention


def tiny_model():
    """A random Llama with GQA whose weights are large enough that attention changes its predictions
    measurably (at the default initialisation the KLs are below float32 precision)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         hidden_size=32, intermediate_size=64, vocab_size=VOCAB,
                                         initializer_range=0.2))
    model.set_attn_implementation("eager")
    return model.eval()


def sequences(seed: int, n: int = 6, length: int = 10) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (length,), generator=gen).tolist() for _ in range(n)]


def setup(seed: int):
    """(model with substitution installed, its replacer, sequences, each head's recorded attention on them)."""
    model = tiny_model()
    seqs = sequences(seed)
    recorded = record_attention(model, torch.tensor(seqs))
    return model, substitute.install(model, id_strings), seqs, recorded


def blended(recorded: dict, layer: int, head: int, weight: float):
    """The head's own attention, a fraction `weight` of the way to the uniform matrix."""
    return lambda tokens: ((1 - weight) * recorded[(layer, head, ids_of(tokens))]
                           + weight * substitute.uniform_attention(tokens))


def exact_kl(model, replacer, heads: dict, seqs) -> float:
    """Summed over predicted tokens: KL(unmodified model || model with `heads` replaced)."""
    ids = torch.tensor(seqs)
    with torch.no_grad():
        replacer.set_heads({})
        before = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
        replacer.set_heads(heads)
        after = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
    replacer.set_heads({})
    return float((before.exp() * (before - after)).sum())


def test_the_estimate_matches_the_exact_kl_of_small_changes():
    model, replacer, seqs, recorded = setup(3)
    heads = all_heads(model)
    # each head moved a different distance towards uniform: the costs differ by head and by distance
    programs = {(l, h): blended(recorded, l, h, 0.05 * (1 + (3 * l + h) % 4)) for l, h in heads}
    estimate = estimated_kl(model, replacer, [], programs, heads, seqs, batch_size=4, samples=400)
    exact = {head: exact_kl(model, replacer, {head: programs[head]}, seqs) for head in heads}
    assert all(exact[h] > 0 for h in heads)
    ratios = np.array([estimate[h] / exact[h] for h in heads])
    assert np.all((ratios > 0.75) & (ratios < 1.33)), ratios  # measured: 0.90-1.05
    assert replacer.heads == {} and not replacer.recording
    assert all(p.requires_grad for p in model.parameters())  # the model is handed back as it was


def test_the_estimate_is_conditioned_on_the_heads_already_replaced():
    model, replacer, seqs, recorded = setup(4)
    programs = {head: blended(recorded, *head, 0.2) for head in all_heads(model)}
    alone = estimated_kl(model, replacer, [], programs, [(1, 0)], seqs, 4, samples=50)
    after_layer0 = estimated_kl(model, replacer, [(0, h) for h in range(4)], programs, [(1, 0)], seqs, 4, samples=50)
    assert alone[(1, 0)] != after_layer0[(1, 0)]
    # a head replaced by exactly its own attention costs nothing, also after others were replaced by theirs
    exact = {head: (lambda tokens, head=head: recorded[(*head, ids_of(tokens))]) for head in all_heads(model)}
    assert estimated_kl(model, replacer, [(0, 0), (0, 2)], exact, [(1, 3)], seqs, 4)[(1, 3)] < 1e-8
    assert estimated_kl(model, replacer, [], programs, [(1, 3)], seqs, 4)[(1, 3)] > 1e-4  # the bound can fail


def test_the_greedy_order_takes_the_faithful_heads_first():
    model, replacer, seqs, recorded = setup(5)
    heads = all_heads(model)
    faithful = {(0, 1), (0, 3), (1, 0), (1, 2)}
    programs = {head: blended(recorded, *head, 0.0 if head in faithful else 1.0) for head in heads}
    logged = []
    order, first = attribution_order(model, replacer, programs, [0, 2, 4, 8], seqs, 4, samples=4, log=logged.append)
    assert sorted(order) == sorted(heads) and set(order[:4]) == faithful
    assert len(logged) == 2  # steps at 2 and 4 heads; 0 and all 8 need no estimate
    assert set(first) == set(heads) and max(first[h] for h in faithful) < min(first[h] for h in set(heads) - faithful)
    tokens = sum(len(s) - 1 for s in seqs)  # per predicted token: the unit of the KL measured when each is replaced
    summed = estimated_kl(model, replacer, [], programs, heads, seqs, 4, samples=4)
    assert all(first[h] == pytest.approx(summed[h] / tokens) for h in heads)
