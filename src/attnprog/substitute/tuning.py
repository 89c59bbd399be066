"""Tuning programs through the model they replace: the weights of the replaced heads' programs, jointly, for the
model's predictions rather than each head's attention.

An offline program is softmax(sum_k w_k cue_k) over j <= i (synthesize/writing.py). Its cues stay exactly as
written; only the weights move. With a set of heads replaced, the weights of all of them are tuned together by
Adam on the KL between the unmodified model's next-token distributions and the substituted model's, on
training text only (the synth split and passages that are in none of val, test or held-out; `training_texts`),
of which every fifth sequence takes no steps and chooses the weights kept (`split_dev`).
The cue matrices of a text are fixed, so a program is a differentiable function of its weights, run through
the model by the ordinary substitution mechanism (HeadReplacer): no attention code is copied.

Weights move in units of each cue's root-mean-square on the training text (as the fit does), so one learning
rate suits an indicator and a distance alike, and an L2 pull to the untuned weights keeps the tuned program
near the readable fit. A program that is not a softmax of weighted cues (an LLM-written one) stays as it is.
"""

from __future__ import annotations

import re
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .. import helpers
from ..contracts import HeadId
from ..settings import TuningSettings
from .mechanism import HeadReplacer, Replacement
from .sweep import next_token_log_probs, padded_batches, token_kl

# One term of a program written by synthesize.writing.program_source.
_TERM = re.compile(r"^    score \+= (?P<weight>\S+) \* (?P<expression>.+?)  # (?P<description>.*)$", re.M)
_SOFTMAX_RETURN = "    return h.causal_softmax(score)"


@dataclass(frozen=True)
class WeightedCues:
    """A program that is a softmax of weighted cues: its weights and, per term, the cue's expression (over
    `h`, `tokens`, `n`) and its description."""
    weights: tuple[float, ...]
    expressions: tuple[str, ...]
    descriptions: tuple[str, ...]


def weighted_cues(source: str) -> WeightedCues | None:
    """The terms of a program file as the offline synthesizer writes it; None for any other program."""
    if _SOFTMAX_RETURN not in source:
        return None
    terms = _TERM.findall(source)
    if not terms:
        return None
    return WeightedCues(tuple(float(w) for w, _, _ in terms), tuple(e for _, e, _ in terms),
                        tuple(d for _, _, d in terms))


def with_cues(source: str, features) -> str:
    """`source` (a softmax of weighted cues) with each of `features` (synthesize.primitives.Feature) it lacks as
    one more term at weight 0: the same program until tuning moves the new weights (to ask whether the cues
    limit what tuning reaches, bench/tuning.py --extra-cues). Any other program is returned as it is."""
    cues = weighted_cues(source)
    if cues is None:
        return source
    terms = "".join(f"    score += 0 * {f.expression}  # {f.description}\n" for f in features
                    if f.expression not in cues.expressions)
    last = source.index("\n", source.rindex("    score += ")) + 1
    return source[:last] + terms + source[last:]


class CueCache:
    """Each cue's n x n matrix per text, computed once: cues are shared by programs and heads, and every
    tuning step reruns the same texts."""

    def __init__(self):
        self._matrices: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}

    def matrix(self, expression: str, tokens: list[str]) -> torch.Tensor:
        key = (expression, tuple(tokens))
        if key not in self._matrices:
            value = eval(expression, {"np": np, "h": helpers}, {"tokens": list(tokens), "n": len(tokens)})
            self._matrices[key] = torch.as_tensor(np.asarray(value, dtype=np.float32))
        return self._matrices[key]

    def stack(self, expressions, tokens: list[str]) -> torch.Tensor:
        return torch.stack([self.matrix(e, tokens) for e in expressions])

    def scales(self, expressions, texts: list[list[str]]) -> torch.Tensor:
        """Each cue's root-mean-square over the lower triangles of `texts` (1 where it is all zero)."""
        out = []
        for e in expressions:
            total, count = 0.0, 0
            for tokens in texts:
                m = self.matrix(e, tokens)
                total += float((m.tril() ** 2).sum())
                count += len(tokens) * (len(tokens) + 1) // 2
            rms = (total / max(count, 1)) ** 0.5
            out.append(rms if rms > 0 else 1.0)
        return torch.tensor(out, dtype=torch.float32)


class TunableProgram:
    """A replacement (mechanism.Replacement) computing softmax(sum_k w_k cue_k) in torch, so its matrix carries
    gradients to the weights. Weights are held as u = w * scale (scale: the cues' rms)."""

    def __init__(self, cues: WeightedCues, cache: CueCache, scale: torch.Tensor):
        self.cues, self.cache, self.scale = cues, cache, scale
        self.u = torch.nn.Parameter(torch.tensor(cues.weights, dtype=torch.float32) * scale)
        self.u0 = self.u.detach().clone()

    @property
    def weights(self) -> np.ndarray:
        return (self.u.detach() / self.scale).double().numpy()

    def __call__(self, tokens: list[str]) -> torch.Tensor:
        n = len(tokens)
        scores = torch.einsum("k,kij->ij", self.u / self.scale, self.cache.stack(self.cues.expressions, tokens))
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)

    def many(self, examples: list[list[str]]) -> list[torch.Tensor]:
        return [self(tokens) for tokens in examples]


@contextmanager
def frozen(model):
    """No weight gradients (only the programs' weights learn); the model is handed back as it was."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def reference_log_probs(model, replacer: HeadReplacer, sequences: list[list[int]], batch_size: int):
    """The unmodified model's next-token log-probabilities per batch (what tuning matches)."""
    device = next(model.parameters()).device
    replacer.set_heads({})
    out = []
    with torch.no_grad():
        for batch, ids, mask in padded_batches(sequences, batch_size, device):
            out.append((batch, ids, mask, next_token_log_probs(model, ids, mask)))
    return out


def predicted_tokens(reference) -> int:
    """The predicted tokens (every real token but each sequence's first) of reference_log_probs' batches."""
    return sum(int(mask[:, 1:].sum()) for _, _, mask, _ in reference)


def batch_kl(model, ids, mask, before) -> torch.Tensor:
    """Summed KL(unmodified || substituted) over the predicted tokens of one batch, with the heads now set."""
    return (token_kl(before, next_token_log_probs(model, ids, mask)) * mask[:, 1:]).sum()


def substituted_kl(model, replacer: HeadReplacer, heads: dict[HeadId, Replacement], reference
                   ) -> tuple[float, int]:
    """Summed KL(unmodified || substituted) over the predicted tokens of the reference batches, and the token
    count."""
    replacer.set_heads(heads)
    try:
        with torch.no_grad():
            total = sum(float(batch_kl(model, ids, mask, before)) for _, ids, mask, before in reference)
    finally:
        replacer.set_heads({})
    return total, predicted_tokens(reference)


# Every DEV_EVERY-th training sequence takes no steps: it is the text that says which weights generalise (the
# training KL falls while held-out text gains nothing, measured at half of SmolLM2's heads).
DEV_EVERY = 5


def split_dev(sequences: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """(steps, dev): the training text tuning steps on, and every DEV_EVERY-th sequence kept out to judge it."""
    return ([s for i, s in enumerate(sequences) if i % DEV_EVERY],
            [s for i, s in enumerate(sequences) if i % DEV_EVERY == 0])


@dataclass
class TuningResult:
    dev_before: float     # mean KL per predicted token on the dev text, untuned weights
    dev_after: float      # ... with the weights kept (the lowest)
    epochs_kept: int      # after how many epochs the kept weights were reached (0: the untuned ones)
    kl_while_tuning: list[float]  # per epoch, the mean KL per token of the batches as they were stepped on
    dev_by_epoch: list[float]     # per epoch, the dev KL after it
    steps: int
    tokens: int           # predicted tokens of the text stepped on
    dev_tokens: int       # ... of the dev text
    seconds: float


def tune(model, replacer: HeadReplacer, tunable: dict[HeadId, TunableProgram],
         fixed: dict[HeadId, Replacement], sequences: list[list[int]], dev: list[list[int]],
         settings: TuningSettings, reference=None, dev_reference=None, log=print) -> TuningResult:
    """Tune the weights of `tunable` (with `fixed` replaced too) by Adam on the mean KL per predicted token over
    `sequences`, plus l2/2 |u - u0|^2 per program (u: weights in units of the cues' rms): one step per batch of
    `settings.batch_size` sequences, `settings.epochs` passes over the text (a step on a batch costs what a
    forward and backward pass of it cost, so steps on batches learn more per second than steps on the whole
    text; `settings.train_tokens` is training_texts' concern). After each epoch the KL on `dev`
    (training text that takes no steps) is measured: the weights kept are those with the lowest dev KL, the
    untuned ones included, and an epoch that raised it is undone and the learning rate halved. So tuning
    never leaves the dev KL higher than it found it. The text stepped on is not measured apart (before and
    after would cost about what an epoch of steps costs): `kl_while_tuning` is its KL as the steps saw it.
    `reference`, `dev_reference`: reference_log_probs of `sequences` and `dev`, if computed."""
    started = time.time()
    heads = {**fixed, **tunable}
    params = [p.u for p in tunable.values()]
    optimiser = torch.optim.Adam(params, lr=settings.learning_rate)
    reference = (reference if reference is not None
                 else reference_log_probs(model, replacer, sequences, settings.batch_size))
    dev_reference = (dev_reference if dev_reference is not None
                     else reference_log_probs(model, replacer, dev, settings.batch_size))
    tokens = predicted_tokens(reference)
    dev_before, dev_tokens = substituted_kl(model, replacer, heads, dev_reference)
    kept, kept_dev, kept_epoch = [p.detach().clone() for p in params], dev_before, 0
    step, kl_while_tuning, dev_by_epoch = 0, [], []
    for epoch in range(settings.epochs):
        with frozen(model):
            replacer.set_heads(heads)
            try:
                total = 0.0
                for _, ids, mask, reference_batch in reference:
                    optimiser.zero_grad()
                    kl = batch_kl(model, ids, mask, reference_batch)
                    (kl / mask[:, 1:].sum()).backward()
                    for program in tunable.values():  # the pull to the untuned weights
                        if program.u.grad is not None:
                            program.u.grad += settings.l2 * (program.u.detach() - program.u0)
                    optimiser.step()
                    total, step = total + float(kl.detach()), step + 1
            finally:
                replacer.set_heads({})
        dev_kl = substituted_kl(model, replacer, heads, dev_reference)[0]
        kl_while_tuning.append(total / max(tokens, 1))
        dev_by_epoch.append(dev_kl / max(dev_tokens, 1))
        log(f"tuning: epoch {epoch + 1}/{settings.epochs}: KL {kl_while_tuning[-1]:.4f} nats/token while tuning, dev "
            f"{dev_by_epoch[-1]:.4f} ({len(tunable)} heads)")
        if dev_kl < kept_dev:
            kept, kept_dev, kept_epoch = [p.detach().clone() for p in params], dev_kl, epoch + 1
        else:  # overshot or overfitted: back to the best weights, with smaller steps
            with torch.no_grad():
                for p, value in zip(params, kept):
                    p.copy_(value)
            for group in optimiser.param_groups:
                group["lr"] /= 2
    with torch.no_grad():
        for p, value in zip(params, kept):
            p.copy_(value)
    return TuningResult(dev_before / max(dev_tokens, 1), kept_dev / max(dev_tokens, 1), kept_epoch, kl_while_tuning,
                        dev_by_epoch, step, tokens, dev_tokens, time.time() - started)


def tunable_programs(sources: dict[HeadId, str], texts: list[list[str]], cache: CueCache | None = None
                     ) -> dict[HeadId, TunableProgram]:
    """A TunableProgram per head whose program source is a softmax of weighted cues (each head its own copy of
    the weights, also where heads share a library program)."""
    cache = cache or CueCache()
    out = {}
    for head, source in sources.items():
        cues = weighted_cues(source)
        if cues is not None:
            out[head] = TunableProgram(cues, cache, cache.scales(cues.expressions, texts))
    return out


def copy_of(program: TunableProgram) -> TunableProgram:
    """A program with the same cues and cache and a snapshot of the weights (for a later stage to move on)."""
    out = TunableProgram(program.cues, program.cache, program.scale)
    with torch.no_grad():
        out.u.copy_(program.u)
    out.u0 = program.u0
    return out


# ---- training text: the synth split and passages that are none of val, test or held-out ----

def training_texts(examples, heldout, passages, tokenize, n_tokens: int, min_words: int, max_words: int,
                   max_tokens: int) -> list[list[int]]:
    """Token ids of the text tuning may read: the synth split of `examples`, then chunks of `passages` (cut as
    the corpus cuts them) that are no example of any split and inside no held-out sequence, until n_tokens
    tokens in all; packed as the held-out text is (data.pack_texts: chunks joined into sequences of at most
    max_tokens tokens), because programs that stand in for heads over a long text must be tuned on long texts
    (tuned on single chunks, they gained on those and not on held-out text). `tokenize(text)` gives token ids."""
    from ..data import chunk_passage, pack_texts

    texts = list(examples[examples["split"] == "synth"]["text"])
    total = sum(len(tokenize(text)) for text in texts)
    seen = set(examples["text"])
    held = list(heldout["text"])
    for passage in passages:
        if total >= n_tokens:
            break
        for chunk in chunk_passage(passage, min_words, max_words):
            if total >= n_tokens:
                break
            if chunk in seen or any(chunk in text for text in held):
                continue
            seen.add(chunk)
            count = len(tokenize(chunk))
            if count <= max_tokens:
                texts.append(chunk)
                total += count
    packed = pack_texts(texts, lambda text: len(tokenize(text)), float("inf"), max_tokens)
    return [list(tokenize(text)) for text in packed]


# ---- staged tuning for the sweep: one set of tuned weights per fraction ----

def tune_stages(model, replacer: HeadReplacer, programs: dict[HeadId, Replacement],
                sources: dict[HeadId, str], order: list[HeadId], counts: dict[float, int],
                sequences: list[list[int]], token_strings, settings: TuningSettings, log=print
                ) -> tuple[dict[float, dict[HeadId, Replacement]], list[dict]]:
    """For each fraction (ascending count), the first `count` heads of `order` replaced and their programs' weights
    tuned together on `sequences` (training text only; split_dev keeps every DEV_EVERY-th sequence out of the
    steps, to choose the weights kept), starting from the previous fraction's tuned weights.
    Returns per fraction the replacements to run (tuned programs; others as they are) and one record per stage."""
    cache = CueCache()
    steps, dev = split_dev(sequences)
    texts = [token_strings(ids) for ids in steps]
    reference = reference_log_probs(model, replacer, steps, settings.batch_size)
    dev_reference = reference_log_probs(model, replacer, dev, settings.batch_size)
    current: dict[HeadId, TunableProgram] = {}
    stages, records = {}, []
    for fraction, count in sorted(counts.items(), key=lambda fc: fc[1]):
        heads = order[:count]
        if not heads:
            continue
        new = tunable_programs({h: sources[h] for h in heads if h not in current and h in sources}, texts, cache)
        tunable = {h: copy_of(current[h]) if h in current else new[h] for h in heads if h in current or h in new}
        fixed = {h: programs[h] for h in heads if h not in tunable}
        result = tune(model, replacer, tunable, fixed, steps, dev, settings, reference=reference,
                      dev_reference=dev_reference, log=log)
        log(f"tuning: fraction {fraction:g} ({len(tunable)} of {len(heads)} heads tunable): dev KL "
            f"{result.dev_before:.4f} -> {result.dev_after:.4f} nats/token (weights of epoch {result.epochs_kept}) "
            f"in {result.seconds:.0f}s")
        current = {**current, **tunable}
        stages[fraction] = {**fixed, **tunable}
        records.append({"fraction": fraction, "n_replaced": len(heads), "n_tuned": len(tunable),
                        "dev_kl_before": result.dev_before, "dev_kl_after": result.dev_after,
                        "epochs_kept": result.epochs_kept, "kl_while_tuning": result.kl_while_tuning,
                        "dev_kl_by_epoch": result.dev_by_epoch, "steps": result.steps, "tokens": result.tokens,
                        "dev_tokens": result.dev_tokens, "seconds": result.seconds})
    return stages, records


# ---- what tuning traded: test IoU of tuned and untuned programs; the tuned programs written out ----

def real_attention(model, replacer: HeadReplacer, sequences: list[list[int]], batch_size: int
                   ) -> list[dict[int, np.ndarray]]:
    """Per sequence, per layer, the unmodified model's attention (heads, n, n)."""
    device = next(model.parameters()).device
    replacer.set_heads({})
    out: list = [None] * len(sequences)
    with torch.no_grad():
        for batch, ids, mask in padded_batches(sequences, batch_size, device):
            attentions = model(input_ids=ids, attention_mask=mask, use_cache=False, output_attentions=True).attentions
            for row, i in enumerate(batch):
                n = len(sequences[i])  # right padding: the example's tokens come first
                out[i] = {layer: a[row, :, :n, :n].float().cpu().numpy() for layer, a in enumerate(attentions)}
    return out


def mean_iou(replacement: Replacement, head: HeadId, texts: list[list[str]], real) -> float:
    """Mean soft IoU over examples between a replacement's matrices and the head's real attention."""
    from ..scoring import soft_iou

    values = []
    for tokens, layers in zip(texts, real):
        matrix = replacement(tokens)
        matrix = matrix.detach().numpy() if torch.is_tensor(matrix) else np.asarray(matrix)
        values.append(soft_iou(matrix, layers[head[0]][head[1]]))
    return float(np.mean(values))


def feature_lookup(features_path) -> dict:
    """expression -> Feature for every cue the offline synthesizer can write (primitives, and their products
    with modifiers and with each other), from its features file: what a tuned program's sentence needs."""
    from ..synthesize.primitives import product, stored_features

    with np.load(features_path) as z:
        primitives, modifiers = stored_features(z), stored_features(z, "modifier_")
    out = {f.expression: f for f in primitives}
    for a in primitives:
        out.update({product(a, m, True).expression: product(a, m, True) for m in modifiers})
        out.update({product(a, b, False).expression: product(a, b, False) for b in primitives})
    return out


def tuned_source(program: TunableProgram, head: HeadId, untuned_name: str, model_name: str, features: dict,
                 synth_texts: list[list[str]], note: str) -> str:
    """A tuned program as a file: the untuned program's cues with the tuned weights, and its sentence regenerated
    from them on the synth split (sentence.program_sentence)."""
    from ..matrices import pack
    from ..synthesize.primitives import Feature
    from ..synthesize.sentence import program_sentence
    from ..synthesize.writing import program_source

    cues = program.cues
    weights = np.array([float(f"{w:.6g}") for w in program.weights])  # exactly what the file will say
    terms = [features.get(e) or Feature(e, e, d) for e, d in zip(cues.expressions, cues.descriptions)]
    X = np.concatenate([np.stack([pack(program.cache.matrix(e, t).numpy()) for e in cues.expressions], axis=1)
                        for t in synth_texts]).astype(np.float64)
    row_lengths = np.concatenate([np.arange(1, len(t) + 1) for t in synth_texts])
    row_starts = np.concatenate([[0], np.cumsum(row_lengths)[:-1]])
    sentence = program_sentence(X, weights, row_starts, terms)
    return program_source(sentence, [(float(w), e, d) for w, e, d in zip(weights, cues.expressions,
                                                                         cues.descriptions)],
                          f"{model_name} {HeadId(*head)}, tuned", note)


def write_tuned(stages: dict[float, dict[HeadId, Replacement]], programs: dict[HeadId, Replacement],
                names: dict[HeadId, str], model_name: str, features_path, synth: list[list[int]],
                test: list[list[int]], model, replacer: HeadReplacer, token_strings, batch_size: int, out_dir,
                records: list[dict]) -> list[dict]:
    """Write each fraction's tuned programs (out_dir/f{fraction}/{head name}.py, the sentence regenerated)
    and return the TUNED rows: per tuned head, its untuned library program and both programs' test IoU."""
    from pathlib import Path

    from ..atomic import atomic_dir, write_json

    features = feature_lookup(features_path) if features_path else {}
    synth_texts = [token_strings(ids) for ids in synth]
    test_texts = [token_strings(ids) for ids in test]
    real = real_attention(model, replacer, test, batch_size) if test else []
    rows, untuned_iou = [], {}
    by_fraction = {r["fraction"]: r for r in records}
    with atomic_dir(out_dir) as folder:
        for fraction, stage in stages.items():
            record = by_fraction[fraction]
            sub = Path(folder) / f"f{fraction:g}"
            sub.mkdir()
            for head, program in stage.items():
                if not isinstance(program, TunableProgram):
                    continue
                note = (f"The weights of library program {names[head]} (fitted to this head's attention), tuned "
                        f"through {model_name} with {record['n_replaced']} heads replaced ({fraction:g} of all): "
                        f"{record['steps']} Adam steps on the KL between the unmodified and the substituted model's "
                        f"next-token distributions over {record['tokens']} training tokens; the weights kept "
                        f"(epoch {record['epochs_kept']}) are those with the lowest KL on {record['dev_tokens']} "
                        f"further training tokens that took no steps: {record['dev_kl_before']:.3f} -> "
                        f"{record['dev_kl_after']:.3f} nats per token there. The cues are the library program's, "
                        "unchanged.")
                source = tuned_source(program, head, names[head], model_name, features, synth_texts,
                                      textwrap.fill(note, 100))
                file = f"f{fraction:g}/{HeadId(*head).name}.py"
                (Path(folder) / file).write_text(source)
                if head not in untuned_iou and real:
                    untuned_iou[head] = mean_iou(programs[head], head, test_texts, real)
                rows.append({"fraction": float(fraction), "layer": head[0], "head": head[1], "program": names[head],
                             "file": file, "test_iou_untuned": untuned_iou.get(head, float("nan")),
                             "test_iou_tuned": mean_iou(program, head, test_texts, real) if real else float("nan")})
        from ..contracts import TUNED
        TUNED.write(rows, Path(folder) / "heads.parquet")
        write_json(Path(folder) / "stages.json", records)
    return rows
