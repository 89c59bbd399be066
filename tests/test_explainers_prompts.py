"""The explainer prompts: edge summaries, the helper API text, the refinement turn, reply parsing."""
import types

import numpy as np

from attnprog import helpers
from attnprog.explainers import prompts

SETTINGS = {"n_examples": 5, "candidates": 3, "bucket_sizes": [15, 10, 10, 10], "min_weight": 0.01,
            "special_cap": 3, "refine": True, "refine_rows": 4, "refine_top_keys": 2}


def random_attention(n, seed=0):
    rng = np.random.default_rng(seed)
    a = np.tril(rng.random((n, n)) ** 4)
    return a / a.sum(axis=1, keepdims=True)


def test_edge_buckets_are_quartiles_with_caps_and_threshold():
    a = random_attention(30)
    buckets = prompts.edge_buckets(a, bucket_sizes=(15, 10, 10, 10), min_weight=0.01, special_cap=3)
    assert [len(b) <= s for b, s in zip(buckets, (15, 10, 10, 10))] == [True] * 4
    weights = a[np.tril_indices(30)]
    kept = weights[weights >= 0.01]
    q75, q50, q25 = np.quantile(kept, [0.75, 0.5, 0.25])
    bounds = [(q75, np.inf), (q50, q75), (q25, q50), (0.01, q25)]
    for bucket, (low, high) in zip(buckets, bounds):
        assert bucket, "every quartile has edges on a dense random matrix"
        ws = [w for _, _, w in bucket]
        assert ws == sorted(ws, reverse=True)
        assert all(low <= w < high or (high == np.inf and w >= low) for w in ws)
        assert sum(i == j for i, j, _ in bucket) <= 3
        assert sum(j == 0 for _, j, _ in bucket) <= 3
        assert all(j <= i for i, j, _ in bucket)


def test_edge_buckets_cap_first_token_edges_of_a_sink_head():
    n = 12
    a = np.zeros((n, n))
    a[:, 0] = 0.9
    a[np.arange(n), np.arange(n)] += 0.1
    a[0, 0] = 1.0
    buckets = prompts.edge_buckets(a, special_cap=3)
    first = [e for bucket in buckets for e in bucket if e[1] == 0]
    assert 0 < len(first) <= 3 * 4
    assert all(sum(j == 0 for _, j, _ in bucket) <= 3 for bucket in buckets)


def test_edges_below_min_weight_are_dropped():
    a = np.tril(np.full((5, 5), 0.005))
    a[:, 0] = 1.0
    assert all(w >= 0.01 for bucket in prompts.edge_buckets(a) for _, _, w in bucket)


def test_head_prompt_lists_tokens_and_edges_in_the_papers_format():
    tokens = ["<s>", "The", " cat", " sat", "."]
    a = np.zeros((5, 5))
    a[np.arange(5), np.maximum(np.arange(5) - 1, 0)] = 1.0  # previous-token head
    text = prompts.head_prompt([(tokens, a)], SETTINGS)
    assert "' cat'[2] -> 'The'[1] (1.00)" in text
    assert "[3]' sat'" in text
    assert "Write 3 different candidate programs" in text


def test_helper_api_text_is_generated_from_the_module():
    text = prompts.describe_helpers()
    public = [name for name, obj in vars(helpers).items()
              if callable(obj) and not name.startswith("_") and getattr(obj, "__module__", "") == helpers.__name__]
    assert public
    for name in public:
        assert f"h.{name}(" in text
    assert helpers.offset.__doc__.split("\n")[0].strip()[:30] in text

    fake = types.ModuleType("fake_helpers", "Fake helpers.")
    exec("def brand_new(tokens, k=2):\n    '''Does something new.'''\n", fake.__dict__)
    fake.brand_new.__module__ = "fake_helpers"
    assert "- h.brand_new(tokens, k=2): Does something new." in prompts.describe_helpers(fake)


def test_system_prompt_states_the_rules_and_signature():
    text = prompts.system_prompt()
    assert "def attention(tokens: list[str]) -> np.ndarray:" in text
    assert "Never hard-code particular words" in text
    assert "numpy, math, re and attnprog.helpers" in text
    assert "h.causal_softmax" in text


def test_example_programs_in_the_system_prompt_run_with_the_real_helpers():
    tokens = ["<s>", "Hello", ",", " world", ".", " Bye"]
    for source in prompts.EXAMPLE_PROGRAMS:  # our own trusted code, not an LLM's
        namespace = {}
        exec(compile(source, "example", "exec"), namespace)
        out = namespace["attention"](tokens)
        assert out.shape == (6, 6)
        assert np.all(np.isfinite(out)) and np.all(np.triu(out, 1) == 0)


def test_refinement_prompt_contrasts_real_and_predicted_rows():
    tokens = ["<s>", "a", " b", " c"]
    real = np.tril(np.ones((4, 4)))
    real /= real.sum(axis=1, keepdims=True)
    predicted = np.eye(4)
    fit = prompts.FitExample(tokens, real, predicted, jsd=0.5)
    text = prompts.refinement_prompt([("c0", "ok", 0.4, None), ("c1", "syntax_error", None, "line 3")], "c0",
                                     fit, fit, SETTINGS)
    assert "c1: failed (syntax_error: line 3)" in text
    assert "Worst fit (JSD 0.500)" in text
    assert "query ' c'[3]: real -> " in text and "predicted -> ' c'[3] 1.00" in text
    assert "improved version of c0" in text
    none_ran = prompts.refinement_prompt([("c0", "runtime_error", None, "boom")], None, None, None, SETTINGS)
    assert "None of the programs ran" in none_ran


def test_extract_programs_handles_fences_truncation_and_bare_code():
    reply = ("Hypothesis A.\n```python\ndef attention(tokens):\n    return 1\n```\nText.\n"
             "```json\n{}\n```\nHypothesis B.\n```\nimport numpy as np\n```\nC:\n```python\ndef attention(t")
    found = prompts.extract_programs(reply)
    assert [p.truncated for p in found] == [False, False, True]
    assert found[0].code == "def attention(tokens):\n    return 1\n"
    assert found[2].code.startswith("def attention(t")
    assert prompts.extract_programs("no code here") == []
    assert len(prompts.extract_programs("def attention(tokens):\n    pass")) == 1


def test_signatures_mode_lists_helpers_without_their_docs():
    full, short = prompts.system_prompt("full"), prompts.system_prompt("signatures")
    assert len(short) < len(full)
    assert "- h.offset(n: int, k: int) -> numpy.ndarray\n" in short
    assert "the previous token" in full.split("## Two examples")[0]
    assert "`offset(n, 1)` the previous token" not in short


def test_a_missing_numpy_or_helpers_import_is_added_and_said():
    from attnprog.explainers.prompts import add_missing_imports
    from attnprog.programs import programs_from_source
    from attnprog.runner import run_programs

    forgot = "def attention(tokens):\n    n = len(tokens)\n    return h.causal_softmax(np.zeros((n, n)))\n"
    fixed = add_missing_imports(forgot)
    assert fixed.splitlines()[:3] == ["# attnprog added the import(s) this program uses without importing:",
                                      "import numpy as np", "from attnprog import helpers as h"]
    (program,) = programs_from_source(fixed, "p", trusted=True)
    (run,) = run_programs([program], [(["a", " b"], "a b")]).values()
    assert run.status == "ok" and run.matrices[0].shape == (2, 2)
    whole = "import numpy as np\nfrom attnprog import helpers as h\n\n" + forgot
    assert add_missing_imports(whole) == whole
    assert add_missing_imports("def attention(tokens):\n    return [[1.0]]\n").startswith("def")
    # a name that merely ends in h or np is not the module
    assert add_missing_imports("def attention(tokens):\n    graph = {}\n    return graph.keys()\n").startswith("def")
