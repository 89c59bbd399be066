"""Tuning programs' weights through the model: it lowers the KL that fitting alone left, recovers a planted
head, and never reads val, test or held-out text."""
import numpy as np
import pandas as pd
import torch

from attnprog import substitute
from attnprog.matrices import pack
from attnprog.settings import SubstitutionSettings, TuningSettings
from attnprog.substitute.tuning import (CueCache, TunableProgram, WeightedCues, substituted_kl, reference_log_probs,
                                        split_dev, training_texts, tune, tune_stages,
                                        weighted_cues, with_cues)
from attnprog.synthesize.fit import fit_weights, split_data
from attnprog.synthesize.writing import program_source

from test_attribution import sequences, tiny_model
from test_substitute import all_heads, id_strings, record_attention

CUES = ("h.offset(n, 0)", "h.offset(n, 1)", "h.first_token(n)", "h.log_distance(n)")


def fitted_cues(recorded, head, seqs, cache) -> WeightedCues:
    """The attention fit alone (the synthesizer's cross-entropy fit) of one head on these cues."""
    texts = [id_strings(s) for s in seqs]
    X = np.concatenate([np.stack([pack(cache.matrix(e, t).numpy()) for e in CUES], axis=1) for t in texts])
    attention = np.concatenate([pack(recorded[(*head, tuple(s))]) for s in seqs])
    data = split_data(X, [len(s) for s in seqs], attention)
    w = fit_weights(data.X, data.y, data.row_starts)
    return WeightedCues(tuple(float(x) for x in w), CUES, CUES)


def planted_model():
    """The tiny random Llama with head 0 of layer 0 planted: its queries are zero, so it attends uniformly
    over j <= i, which the cues express exactly with every weight 0."""
    model = tiny_model()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:head_dim] = 0
    return model


def test_the_planted_head_attends_uniformly():
    model, seqs = planted_model(), sequences(1)
    recorded = record_attention(model, torch.tensor(seqs))
    n = len(seqs[0])
    np.testing.assert_allclose(recorded[(0, 0, tuple(seqs[0]))], np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None],
                               atol=1e-6)


def setup_programs(planted_start=None):
    """The planted model with substitution installed, training and other sequences, and each head's program
    fitted to its attention on the training sequences (the planted head's from `planted_start` if given)."""
    model, train, other = planted_model(), sequences(1), sequences(2)
    recorded = record_attention(model, torch.tensor(train))
    replacer = substitute.install(model, id_strings)
    cache = CueCache()
    texts = [id_strings(s) for s in train]
    programs = {}
    for head in all_heads(model):
        cues = fitted_cues(recorded, head, train, cache)
        if head == (0, 0) and planted_start is not None:
            cues = WeightedCues(planted_start, CUES, CUES)
        programs[head] = TunableProgram(cues, cache, cache.scales(CUES, texts))
    return model, replacer, train, other, programs


def settings(epochs: int, learning_rate: float) -> TuningSettings:
    return TuningSettings.defaults(epochs=epochs, learning_rate=learning_rate, l2=0.0, batch_size=4)


def mean_kl(model, replacer, programs, seqs) -> float:
    with torch.no_grad():
        total, count = substituted_kl(model, replacer, programs, reference_log_probs(model, replacer, seqs, 4))
    return total / count


def test_tuning_lowers_the_kl_that_fitting_alone_left():
    model, replacer, train, other, programs = setup_programs()
    before_train = mean_kl(model, replacer, programs, train)
    # dev is the training text itself here: random tokens have no regularity that carries to other random
    # tokens (see below), and this test is of the optimisation; the planted head's test holds out real dev text
    result = tune(model, replacer, programs, {}, train, train, settings(20, 0.1),
                  log=lambda *_: None)
    assert abs(result.dev_before - before_train) < 1e-6 and result.epochs_kept > 0
    # measured: 0.35 -> 0.28 nats/token. (On other random token sequences the gain need not carry over: random
    # tokens have no regularity for weights to learn; the planted head's test checks that the truth does.)
    assert result.dev_after < 0.9 * before_train, (before_train, result.dev_after)
    assert abs(mean_kl(model, replacer, programs, train) - result.dev_after) < 1e-6  # the tuned weights are in place
    assert len(result.kl_while_tuning) == len(result.dev_by_epoch) == 20
    assert result.steps == 20 * ((len(train) + 3) // 4)  # one step per batch of 4, every epoch
    assert all(p.requires_grad for p in model.parameters()) and replacer.heads == {}  # model handed back


def test_tuning_recovers_the_planted_head_from_a_wrong_program():
    """Only the planted head replaced, its program starting at 'previous token and first token': the KL is zero
    exactly at weights 0 (uniform), and tuning finds them."""
    model, replacer, train, other, programs = setup_programs(planted_start=(0.0, 2.0, 1.5, 0.0))
    planted = {(0, 0): programs[(0, 0)]}
    before, before_other = mean_kl(model, replacer, planted, train), mean_kl(model, replacer, planted, other)
    result = tune(model, replacer, planted, {}, train, other, settings(30, 0.1),
                  log=lambda *_: None)
    after = mean_kl(model, replacer, planted, train)
    assert before > 0.01 and after < 0.02 * before, (before, after)
    assert abs(result.dev_before - before_other) < 1e-6 and result.dev_after < 0.02 * before_other
    assert np.abs(planted[(0, 0)].weights).max() < 0.3, planted[(0, 0)].weights
    assert mean_kl(model, replacer, planted, other) < 0.02 * before_other  # the truth holds on other text too


def test_tuning_keeps_the_weights_that_do_best_on_dev_text_and_never_worse_than_untuned():
    """Steps far too large overshoot: whatever they do, the weights kept are the ones with the lowest KL on the
    dev text (the untuned ones where no epoch beat them), and they are the weights left in place."""
    model, replacer, train, other, programs = setup_programs(planted_start=(0.0, 2.0, 1.5, 0.0))
    planted = {(0, 0): programs[(0, 0)]}
    untuned = planted[(0, 0)].weights.copy()
    result = tune(model, replacer, planted, {}, train, other, settings(4, 50.0),
                  log=lambda *_: None)
    assert result.dev_after <= result.dev_before
    assert abs(mean_kl(model, replacer, planted, other) - result.dev_after) < 1e-6  # the kept weights are in place
    if result.epochs_kept == 0:
        np.testing.assert_array_equal(planted[(0, 0)].weights, untuned)
    # and with steps of a sensible size the dev KL falls: the guard does not stop tuning that generalises
    model, replacer, train, other, programs = setup_programs(planted_start=(0.0, 2.0, 1.5, 0.0))
    planted = {(0, 0): programs[(0, 0)]}
    result = tune(model, replacer, planted, {}, train, other, settings(4, 0.1),
                  log=lambda *_: None)
    assert result.epochs_kept > 0 and result.dev_after < 0.5 * result.dev_before


def test_training_text_is_split_into_steps_and_dev_and_every_sequence_is_used_once():
    sequences = [[i] for i in range(12)]
    steps, dev = split_dev(sequences)
    assert sorted(steps + dev) == sequences and dev == [[0], [5], [10]] and not set(map(tuple, steps)) & set(map(tuple, dev))


def test_weights_move_only_where_asked_and_the_cues_stay_as_written():
    source = program_source("Mostly the previous token.", [(2.5, "h.offset(n, 1)", "j is the previous token"),
                                                          (-0.25, "h.log_distance(n)", "log(1 + i - j)")],
                            "m L0H0", "note")
    cues = weighted_cues(source)
    assert cues.weights == (2.5, -0.25) and cues.expressions == ("h.offset(n, 1)", "h.log_distance(n)")
    assert weighted_cues("def attention(tokens):\n    return h.uniform(len(tokens))\n") is None
    cache = CueCache()
    program = TunableProgram(cues, cache, cache.scales(cues.expressions, [["a", "b", "c"]]))
    np.testing.assert_allclose(program.weights, [2.5, -0.25], rtol=1e-6)
    from attnprog import helpers as h
    tokens = ["a", "b", "c", "d"]
    expected = h.causal_softmax(2.5 * h.offset(4, 1) - 0.25 * h.log_distance(4))
    np.testing.assert_allclose(program(tokens).detach().numpy(), expected, atol=1e-6)


def test_added_cues_start_at_weight_0_so_the_program_is_unchanged_until_tuned():
    from attnprog.synthesize.primitives import FEATURES

    def attention(program: str, tokens):
        namespace = {}
        exec(program, namespace)  # a test's own source, trusted
        return namespace["attention"](tokens)

    features = {f.name: f for f in FEATURES}
    source = program_source("Mostly the previous token.", [(2.5, "h.offset(n, 1)", "j is the previous token")],
                            "m L0H0", "note")
    extended = with_cues(source, [features["previous"], features["first"], features["log_distance"]])
    cues = weighted_cues(extended)
    # the cue it had is not added twice; the new ones follow it, at weight 0
    assert cues.expressions == ("h.offset(n, 1)", "h.first_token(n)", "h.log_distance(n)")
    assert cues.weights == (2.5, 0.0, 0.0)
    tokens = ["The", "cat", "sat", ".", "It", "ran"]
    np.testing.assert_array_equal(attention(extended, tokens), attention(source, tokens))
    uniform = "def attention(tokens):\n    return h.uniform(len(tokens))\n"
    assert with_cues(uniform, [features["first"]]) == uniform


def test_linguistic_cues_are_causal_and_added_like_any_other():
    """bench/tuning.py --extra-cues can add the parse-based cues: each is a causal matrix that is on somewhere,
    and a program that gains them parses back with them at weight 0 (their expressions hold quotes and commas;
    that the program is unchanged is the test above's)."""
    from attnprog.synthesize.primitives import LINGUISTIC_FEATURES, feature_matrix

    tokens = ["The", " big", " dog", " chased", " the", " cat", " across", " the", " yard", "."]
    for feature in LINGUISTIC_FEATURES:
        matrix = feature_matrix(feature, tokens)
        assert not np.triu(matrix, 1).any() and matrix.any(), feature.name
    source = program_source("Mostly the previous token.", [(2.5, "h.offset(n, 1)", "j is the previous token")],
                            "m L0H0", "note")
    extended = with_cues(source, LINGUISTIC_FEATURES)
    cues = weighted_cues(extended)
    assert cues.expressions == ("h.offset(n, 1)",) + tuple(f.expression for f in LINGUISTIC_FEATURES)
    assert cues.weights == (2.5,) + (0.0,) * len(LINGUISTIC_FEATURES)


def corpus(marker: str):
    """Examples (synth / val / test) and held-out text; val, test and held-out texts carry `marker`."""
    words = lambda k, tag: " ".join(f"{tag}{k}w{i}" for i in range(16)) + "."
    rows = [{"split": s, "text": words(k, "syn" if s == "synth" else marker)} for k, s in
            enumerate(["synth"] * 3 + ["val"] * 3 + ["test"] * 3)]
    examples = pd.DataFrame(rows)
    heldout = pd.DataFrame({"text": [words(10, marker) + " " + words(11, marker)]})
    tokenize = lambda text: [sum(map(ord, w)) % 64 for w in text.split()]
    examples["input_ids"] = examples.text.map(tokenize)
    # the passages the extra text is drawn from repeat every val, test and held-out text, and add new ones
    passages = list(examples.text) + [words(11, marker)] + [words(20 + k, "extra") for k in range(4)]
    return examples, heldout, passages, tokenize


def test_training_text_is_the_synth_split_and_passages_that_are_none_of_val_test_or_heldout():
    examples, heldout, passages, tokenize = corpus("SECRET")
    texts = list(examples[examples.split == "synth"].text) + [p for p in passages if p.startswith("extra")]
    # each text is 17 tokens: packed as the held-out text is, three to a sequence of at most 60 tokens
    train = training_texts(examples, heldout, passages, tokenize, 10_000, 15, 60, 60)
    assert train == [tokenize(" ".join(texts[k:k + 3])) for k in (0, 3, 6)]
    one_each = training_texts(examples, heldout, passages, tokenize, 10_000, 15, 60, 20)  # no room for two
    assert one_each == [tokenize(t) for t in texts]
    assert len(training_texts(examples, heldout, passages, tokenize, 40, 15, 60, 20)) == 3  # stops at n_tokens


def test_tuned_weights_do_not_depend_on_val_test_or_heldout_text():
    """Tuning twice, on corpora that differ only in their val, test and held-out text, gives the same weights;
    a leak of any of them into tuning would change them."""
    results = []
    for marker in ("alpha", "omega"):
        examples, heldout, passages, _ = corpus(marker)
        tokenize = lambda text: [sum(map(ord, w)) % 64 for w in text.split()]
        train = training_texts(examples, heldout, passages, tokenize, 10_000, 15, 60, 20)  # a text per sequence
        model = tiny_model()
        replacer = substitute.install(model, id_strings)
        source = program_source("s", [(1.0, "h.offset(n, 1)", "previous"), (0.5, "h.first_token(n)", "first")],
                                "t", "n")
        heads = all_heads(model)[:3]
        stages, _ = tune_stages(model, replacer, {}, {h: source for h in heads}, heads, {0.5: 2, 1.0: 3}, train,
                                id_strings, TuningSettings.defaults(epochs=2, learning_rate=0.1, l2=0.0, batch_size=4),
                                log=lambda *_: None)
        results.append({f: {h: p.weights for h, p in s.items()} for f, s in stages.items()})
    for fraction in (0.5, 1.0):
        for head, weights in results[0][fraction].items():
            assert np.array_equal(weights, results[1][fraction][head])
            assert not np.allclose(weights, [1.0, 0.5])  # tuning did move them


def test_the_sweep_runs_tuned_side_by_side_and_writes_the_tuned_programs(tiny_models, tmp_path):
    from attnprog import data, models
    from attnprog.contracts import TUNED
    from test_substitute import make_library
    from tinyworld import tiny_config

    info = models.describe_model("tiny", {"local_dir": str(tiny_models["llama"])})
    corpus = {**tiny_config({})["corpus"], "max_tokens": 96}
    tokenizer = models.load_tokenizer(info)
    examples, heldout = data.build_corpus(corpus, tokenizer)
    examples.to_parquet(tmp_path / "examples.parquet")
    heldout.to_parquet(tmp_path / "heldout.parquet")
    heads = {(layer, head): ("previous_token" if head < 2 else "first_token", 0.9 - 0.1 * head)
             for layer in range(2) for head in range(4)}
    library = make_library(tmp_path / "library", heads)
    cue_program = program_source("Mostly the previous token.", [(2.0, "h.offset(n, 1)", "j is the previous token"),
                                                               (0.5, "h.first_token(n)", "j is the first token")],
                                 "tiny", "A weighted-cue program.")
    (library.program_dir / "previous_token.py").write_text(cue_program)
    settings = SubstitutionSettings.defaults(
        fractions=(0, 0.5, 1.0), methods=("programs", "attribution", "tuned", "uniform"), random_seeds=(),
        heldout_tokens=200, batch_size=4, bootstrap=100, single_head_count=3, single_head_split="test",
        noncausal="prefixwise", attribution_samples=1,
        tuning=TuningSettings.defaults(epochs=2, learning_rate=0.1, l2=0.0, train_tokens=400))
    passages = [" ".join(f"word{k}x{i}" for i in range(20)) + "." for k in range(30)]
    out = tmp_path / "substitution"
    tuning = substitute.TuningInputs(corpus, passages, None, out / "tuned")
    summary = substitute.substitution_sweep(info, library, tmp_path / "examples.parquet", tmp_path / "heldout.parquet",
                                            settings, out / "sweep.parquet", out / "single_heads.parquet",
                                            out / "orders.parquet", out / "summary.json", "cpu",
                                            log=lambda m: None, tuning=tuning)
    sweep = pd.read_parquet(out / "sweep.parquet")
    assert set(sweep.method) == {"programs", "attribution", "tuned", "uniform"}
    main = summary.splits[summary.split]
    assert main["tuned"]["0"] == 0 and set(main["tuned_interval"]) == {"0", "0.5", "1"}
    stages = summary.tuning["stages"]
    assert [s["fraction"] for s in stages] == [0.5, 1.0] and [s["n_replaced"] for s in stages] == [4, 8]
    assert stages[1]["n_tuned"] == 4  # the four heads whose program is a softmax of weighted cues
    assert all(s["dev_kl_after"] <= s["dev_kl_before"] for s in stages)
    rows = TUNED.read(out / "tuned" / "heads.parquet")
    assert len(rows) == stages[0]["n_tuned"] + 4 and set(rows.program) == {"previous_token"}
    for row in rows.itertuples():
        source = (out / "tuned" / row.file).read_text()
        cues = weighted_cues(source)
        assert set(cues.expressions) == {"h.offset(n, 1)", "h.first_token(n)"}  # the cues, as written
        assert 0 < row.test_iou_tuned <= 1 and 0 < row.test_iou_untuned <= 1
    # the tuned runs are the attribution order's heads with other weights
    table = pd.read_parquet(out / "orders.parquet")
    tuned_order = table[table.method == "tuned"].sort_values("rank")
    attribution = table[table.method == "attribution"].sort_values("rank")
    assert list(zip(tuned_order.layer, tuned_order["head"])) == list(zip(attribution.layer, attribution["head"]))


def test_the_written_tuned_program_runs_what_was_tuned():
    from attnprog.programs import programs_from_source
    from attnprog.substitute.tuning import tuned_source

    cues = WeightedCues((2.0, -0.3, 1.0), ("h.offset(n, 1)", "h.log_distance(n)", "h.first_token(n)"),
                        ("j is the previous token", "log(1 + i - j)", "j is the first token"))
    cache = CueCache()
    texts = [["The", " cat", " sat", "."], ["A", " dog", ",", " ran", " off", "."]]
    program = TunableProgram(cues, cache, cache.scales(cues.expressions, texts))
    with torch.no_grad():
        program.u.mul_(torch.tensor([0.5, 2.0, -1.0]))  # as if tuned
    source = tuned_source(program, (0, 1), "L0H1_c2", "tiny", {}, texts, "note")
    assert source.startswith('"""') and "L0H1, tuned" in source
    written = programs_from_source(source, "tuned", trusted=True)[0]
    namespace = {}
    exec(compile(written.source, "tuned.py", "exec"), namespace)
    for tokens in texts:
        np.testing.assert_allclose(namespace["attention"](tokens), program(tokens).detach().numpy(), atol=1e-5)
