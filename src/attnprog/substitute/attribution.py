"""The `attribution` order: heads chosen by what replacing them is estimated to cost the model's predictions,
*given the heads already replaced* (attribution patching, recomputed between steps).

For a head h whose attention in the running model is A_h and whose program gives A_hat_h, let
delta_h = A_hat_h - A_h. To second order, replacing h moves the model's next-token distributions by

    KL_h ~ 1/2 delta_h^T F delta_h        (F: the Fisher information of the predictions w.r.t. A_h)

and for a gradient g of the loss on next tokens *sampled from the model itself*, E[(g . delta_h)^2] =
delta_h^T F delta_h. So one forward pass and a few backward passes (`samples`) estimate KL_h for every head
at once. The KL is the systematic part of a replacement's cost: it grows with the size of the change and adds
up over heads, where the first-order change on the real next tokens (g . delta with the true targets) is
mostly noise whose sign depends on the text (measured: ordering by it, or by its size, did no better than IoU).

The order is greedy: at each fraction of the sweep, estimate every remaining head's KL on the model with the
heads chosen so far substituted, and add the cheapest. Selection uses the val split only; the sweep reports
held-out text.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from ..contracts import HeadId
from .mechanism import HeadReplacer, Replacement
from .sweep import next_token_log_probs, padded_batches


@contextmanager
def gradients_through_attention(model, replacer: HeadReplacer):
    """Forward passes that keep each layer's attention probabilities with their gradients: the parameters are
    frozen (no weight gradients are needed) and the input embeddings require a gradient instead."""
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
    replacer.recording, replacer.recorded = True, {}
    try:
        yield
    finally:
        hook.remove()
        replacer.recording, replacer.recorded = False, {}
        for p, flag in frozen:
            p.requires_grad_(flag)


def sampled_gradients(model, replacer: HeadReplacer, sequences: list[list[int]], batch_size: int, samples: int,
                      seed: int = 0):
    """The Fisher's samples, batch by batch, with the heads now set on `replacer` substituted. Yields per batch
    its attention probabilities (layer -> (probs, attention mask), as the replacer records them) and an iterator
    over `samples` next-token draws from the model itself: each step of it runs one backward pass, leaving in
    each probs.grad the gradient of that draw's summed negative log-likelihood."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with gradients_through_attention(model, replacer):
        for _, ids, mask in padded_batches(sequences, batch_size, device):
            replacer.recorded = {}
            logp = next_token_log_probs(model, ids, mask)
            with torch.no_grad():
                draws = [torch.multinomial(logp.exp().reshape(-1, logp.shape[-1]), 1, generator=generator)
                         .reshape(ids[:, 1:].shape) for _ in range(samples)]
            yield replacer.recorded, _backward_passes(logp, mask[:, 1:].bool(), draws, replacer.recorded)


def _backward_passes(logp, valid, draws, recorded):
    """One backward pass per draw of next tokens (see sampled_gradients); the graph is kept until the last."""
    for s, target in enumerate(draws):
        for probs, _ in recorded.values():
            probs.grad = None
        (-(logp.gather(-1, target[..., None])[..., 0] * valid).sum()).backward(retain_graph=s < len(draws) - 1)
        yield


def estimated_kl(model, replacer: HeadReplacer, replaced: list[HeadId],
                 programs: dict[HeadId, Replacement], candidates: list[HeadId],
                 sequences: list[list[int]], batch_size: int, samples: int = 2, seed: int = 0
                 ) -> dict[HeadId, float]:
    """Each candidate head's estimated KL (nats, summed over the predicted tokens) between the model's
    next-token distributions with `replaced` substituted, and with the candidate substituted as well."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in candidates:
        by_layer.setdefault(layer, []).append(head)
    kl = {head: 0.0 for head in candidates}
    replacer.set_heads({head: programs[head] for head in replaced})
    for recorded, draws in sampled_gradients(model, replacer, sequences, batch_size, samples, seed):
        with torch.no_grad():
            deltas = {}
            for layer, heads in by_layer.items():
                probs, attention_mask = recorded[layer]
                new, real_rows = replacer.replacement_matrices(layer, heads, programs, probs.shape,
                                                               attention_mask, probs.device)
                deltas[layer] = (heads, (new - probs[:, heads].float()) * real_rows[:, None, :, None])
        for _ in draws:
            with torch.no_grad():
                for layer, (heads, delta) in deltas.items():
                    grad = recorded[layer][0].grad[:, heads].float()
                    per_sequence = (delta * grad).sum((2, 3)).double()  # (batch, heads)
                    for j, head in enumerate(heads):
                        kl[(layer, head)] += 0.5 * float((per_sequence[:, j] ** 2).sum()) / samples
    replacer.set_heads({})
    return kl


def attribution_order(model, replacer: HeadReplacer, programs: dict[HeadId, Replacement],
                      counts: list[int], sequences: list[list[int]], batch_size: int, samples: int = 2,
                      log=print) -> tuple[list[HeadId], dict[HeadId, float]]:
    """Every head with a program, in replacement order: at each cumulative count in `counts` (ascending), the
    remaining heads with the smallest estimated KL given those already chosen; after the last count, the rest
    by their last estimate. Also returns the first step's estimates (nothing replaced) in nats per predicted
    token, for validation against the KL measured when each head is replaced alone."""
    order: list[HeadId] = []
    remaining = sorted(programs)
    steps = sorted({c for c in counts if 0 < c < len(programs)}) or [0]  # [0]: one estimate, to rank them all
    first = None
    for count in steps:
        started = time.time()
        kl = estimated_kl(model, replacer, order, programs, remaining, sequences, batch_size, samples)
        first = first or kl
        remaining.sort(key=lambda head: (kl[head], head))
        picked, remaining = remaining[: count - len(order)], remaining[count - len(order):]
        order += picked
        log(f"substitution: attribution step to {len(order)} heads in {time.time() - started:.1f}s "
            f"(estimated KL of those picked: {sum(kl[h] for h in picked):.2f} nats)")
    tokens = sum(len(sequence) - 1 for sequence in sequences)
    return order + remaining, {head: kl / tokens for head, kl in first.items()}
