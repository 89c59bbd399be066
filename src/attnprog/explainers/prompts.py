"""The prompts an LLM explainer sees, and the parsing of its replies into program sources.

The system prompt is static (the task, the program format, the helper module's API, two worked examples)
so that the API can cache it across every head of a run. The first user turn shows one head: a few example
texts with the head's strongest edges, bucketed by weight quartile, written `' cat'[3] -> 'The'[0] (0.41)`
(METHOD.md, step 2). The refinement turn shows the best candidate's best- and worst-fit examples, real
against predicted attention, and asks for one revised program.

The helper API text is generated from `attnprog.helpers`' own docstrings, so it never drifts from the code.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from types import ModuleType

import numpy as np

# Two programs that show the format and the helpers (tests run them against the real helper module).
EXAMPLE_PROGRAMS = [
    '''"""Each token attends to the token before it; the first token, having none, attends to itself."""
import numpy as np
from attnprog import helpers as h


def attention(tokens: list[str]) -> np.ndarray:
    n = len(tokens)
    # Row 0 has no previous token: the small first-token term gives it somewhere to go.
    return h.offset(n, 1) + 0.01 * h.first_token(n)
''',
    '''"""Each token attends to the most recent punctuation mark up to and including itself, and to the first
token while no punctuation has appeared yet; a weaker share always goes to the first token."""
import numpy as np
from attnprog import helpers as h


def attention(tokens: list[str]) -> np.ndarray:
    n = len(tokens)
    scores = 3.0 * h.most_recent(h.is_punctuation(tokens)) + 1.0 * h.first_token(n)
    return h.causal_softmax(scores)
''',
]

SYSTEM_TEMPLATE = """\
You explain attention heads of a transformer language model by writing short Python programs.

An attention head maps a text of n tokens to an n x n matrix A: row i says how much token i (the query) \
attends to each token j <= i (the keys), and each row sums to 1. You will see one head's strongest \
attention weights on a few example texts. Write programs that reproduce the head's attention from the \
token strings alone, without the model. Programs are scored by how well their matrices match the real ones \
on other texts the head has seen.

## Program format

Each program is a complete Python module: a docstring saying in plain English what the head does (one to \
three sentences a person can read without the code), then a function

    def attention(tokens: list[str]) -> np.ndarray:

that returns an n x n array of non-negative weights for n = len(tokens).

Rules:
- The only imports allowed are numpy, math, re and attnprog.helpers. No files, network, subprocesses, \
randomness or global state.
- Row i may depend only on tokens[0..i]: the model is causal and cannot see later tokens.
- Never hard-code particular words or tokens, such as words copied from the examples: a program must carry \
over to new text. Describe general properties instead: position and distance, punctuation, word and \
sentence boundaries, repeated tokens, token classes, the helpers' general word classes, parts of speech \
and syntactic relations (the helpers' spaCy analyses, which read only each prefix and so stay causal; they \
are slower, so use them when the head is about syntax).
- Your output is normalised for you: entries above the diagonal are dropped, negatives clipped to 0, each \
row divided by its sum, and an all-zero row attends to token 0. Unnormalised scores are fine; use \
h.causal_softmax for softmax-style scores.
- Keep programs short (under 40 lines) and readable; the docstring is the explanation people will read.

Tokens are the strings the model saw, with their leading space (' cat'); the first token may be a special \
token such as '<s>' or '<|endoftext|>'.

## The helper module (`from attnprog import helpers as h`)

{helpers}

## Two examples

```python
{example_0}```

```python
{example_1}```
"""


def _one_line(text: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    if not text:
        return ""
    first = inspect.cleandoc(text).split("\n\n")[0]
    return " ".join(first.split())


def describe_helpers(module: ModuleType | None = None, docs: bool = True) -> str:
    """The helper module's API for a prompt: its docstring, then one line per public function (with the
    first paragraph of its docstring unless `docs` is off) and constant."""
    if module is None:
        from attnprog import helpers as module
    lines = [inspect.cleandoc(module.__doc__ or "").strip(), "", "Functions:"]
    for name, obj in vars(module).items():
        if name.startswith("_") or not inspect.isfunction(obj) or obj.__module__ != module.__name__:
            continue
        signature = str(inspect.signature(obj)).replace("'", "")
        lines.append(f"- h.{name}{signature}: {_one_line(obj.__doc__)}" if docs else f"- h.{name}{signature}")
    constants = [(name, obj) for name, obj in vars(module).items()
                 if name.isupper() and not name.startswith("_") and isinstance(obj, (str, int, float, frozenset))]
    if constants:
        lines += ["", "Constants:"]
        for name, obj in constants:
            shown = f"a frozenset of {len(obj)} strings" if isinstance(obj, frozenset) else repr(obj)
            lines.append(f"- h.{name}: {shown}")
    return "\n".join(lines)


def system_prompt(helper_docs: str = "full") -> str:
    """The static part of every prompt (identical for all heads of a run, so the API can cache it).
    `helper_docs="signatures"` lists the helpers without their docstrings: a third shorter, for
    open-weights models with a small context window."""
    return SYSTEM_TEMPLATE.format(helpers=describe_helpers(docs=helper_docs == "full"),
                                  example_0=EXAMPLE_PROGRAMS[0], example_1=EXAMPLE_PROGRAMS[1])


# ---- the head's data ----

def token_label(tokens: list[str], i: int) -> str:
    return f"{tokens[i]!r}[{i}]"


def edge_buckets(attention: np.ndarray, bucket_sizes=(15, 10, 10, 10), min_weight: float = 0.01,
                 special_cap: int = 3) -> list[list[tuple[int, int, float]]]:
    """The strongest edges (i, j, weight) of one matrix, grouped by weight quartile, top quartile first.

    Weights below `min_weight` are dropped; each bucket keeps its heaviest edges up to its size, with at
    most `special_cap` self-edges (j = i) and `special_cap` edges to the first token (j = 0), since those
    dominate many heads and would crowd out the rest."""
    rows, cols = np.tril_indices(attention.shape[0])
    weights = attention[rows, cols].astype(float)
    keep = weights >= min_weight
    rows, cols, weights = rows[keep], cols[keep], weights[keep]
    if len(weights) == 0:
        return [[] for _ in bucket_sizes]
    order = np.argsort(-weights, kind="stable")
    # Quartile of each edge, 0 = top: cut the weights at their 75th, 50th and 25th percentiles.
    cuts = np.quantile(weights, [0.75, 0.5, 0.25])
    quartile = np.searchsorted(-cuts, -weights, side="left")
    buckets = []
    for q, size in enumerate(bucket_sizes):
        chosen, n_self, n_first = [], 0, 0
        for k in order:
            if quartile[k] != q or len(chosen) >= size:
                continue
            i, j = int(rows[k]), int(cols[k])
            if (i == j and n_self >= special_cap) or (j == 0 and n_first >= special_cap):
                continue
            n_self += i == j
            n_first += j == 0
            chosen.append((i, j, float(weights[k])))
        buckets.append(chosen)
    return buckets


BUCKET_NAMES = ["top quartile", "second quartile", "third quartile", "bottom quartile"]


def describe_example(number: int, tokens: list[str], attention: np.ndarray, settings: dict) -> str:
    """One example text, its tokens and the head's strongest edges on it."""
    lines = [f"### Example {number}", "Tokens: " + " ".join(f"[{i}]{t!r}" for i, t in enumerate(tokens))]
    buckets = edge_buckets(attention, settings["bucket_sizes"], settings["min_weight"], settings["special_cap"])
    for name, edges in zip(BUCKET_NAMES, buckets):
        if edges:
            lines.append(f"{name}:")
            lines += [f"  {token_label(tokens, i)} -> {token_label(tokens, j)} ({w:.2f})" for i, j, w in edges]
    return "\n".join(lines)


def head_prompt(examples: list[tuple[list[str], np.ndarray]], settings: dict) -> str:
    """The first user turn: the head's edges on a few examples, and the request for k programs."""
    k = settings["candidates"]
    intro = (
        f"Here is one attention head on {len(examples)} example texts. Each edge "
        "`'query'[i] -> 'key'[j] (weight)` says token i attends to token j with that weight. Edges are grouped "
        f"by weight quartile within each example; weights below {settings['min_weight']} are left out, and each "
        f"group lists at most {settings['special_cap']} self-edges (i -> i) and {settings['special_cap']} edges "
        "to the first token.")
    ask = (f"Write {k} different candidate programs, each testing a different hypothesis about what this head "
           "does. Put each program in its own ```python block, with one sentence before it naming the hypothesis."
           if k > 1 else
           "Write one program that reproduces this head, in a ```python block, with one sentence before it "
           "naming your hypothesis.")
    parts = [intro] + [describe_example(n + 1, tokens, att, settings) for n, (tokens, att) in enumerate(examples)]
    return "\n\n".join(parts + [ask])


# ---- the refinement turn ----

def _top_keys(row: np.ndarray, tokens: list[str], top: int) -> str:
    order = [j for j in np.argsort(-row, kind="stable")[:top] if row[j] >= 0.01]
    return ", ".join(f"{token_label(tokens, int(j))} {row[j]:.2f}" for j in order) or "(nothing above 0.01)"


def contrast_rows(tokens: list[str], real: np.ndarray, predicted: np.ndarray, n_rows: int, top: int) -> str:
    """Real against predicted attention for the rows where they differ most (total-variation distance);
    rows that already match (distance below 0.02) are left out."""
    distance = 0.5 * np.abs(real - predicted).sum(axis=1)
    rows = sorted(i for i in np.argsort(-distance, kind="stable")[:n_rows] if distance[i] >= 0.02)
    if not rows:
        return "  (every row matches to within 0.02)"
    return "\n".join(f"  query {token_label(tokens, int(i))}: real -> {_top_keys(real[i], tokens, top)} | "
                     f"predicted -> {_top_keys(predicted[i], tokens, top)}" for i in rows)


@dataclass
class FitExample:
    """One example as the best candidate saw it: for the refinement turn."""
    tokens: list[str]
    real: np.ndarray
    predicted: np.ndarray
    jsd: float


def refinement_prompt(results: list[tuple[str, str, float | None, str | None]], best: str | None,
                      best_fit: FitExample | None, worst_fit: FitExample | None, settings: dict) -> str:
    """The second user turn. `results` holds (candidate, status, mean JSD or None, error or None) per program
    from the first reply; `best` names the lowest-JSD candidate that ran, or None when none ran."""
    lines = ["I ran your programs on the head's synthesis texts. Mean Jensen-Shannon distance per program "
             "(0 = identical to the head, 1 = nothing in common):"]
    for name, status, jsd, error in results:
        lines.append(f"- {name}: {jsd:.3f}" if status == "ok" else f"- {name}: failed ({status}: {error})")
    if best is None:
        lines += ["", "None of the programs ran. Write one corrected program that follows the program format "
                      "exactly, in a single ```python block."]
        return "\n".join(lines)
    lines += ["", f"The best was {best}.", *fit_contrasts(best, best_fit, worst_fit, settings),
              "", f"Write one improved version of {best} that fixes these mistakes while keeping what it gets "
                  "right, in a single ```python block, following the program format."]
    return "\n".join(lines)


def fit_contrasts(name: str, best_fit: FitExample, worst_fit: FitExample, settings: dict) -> list[str]:
    """The lines showing where program `name` differs most from the real attention, on the text it fits best
    and the text it fits worst."""
    n_rows, top = settings["refine_rows"], settings["refine_top_keys"]
    lines = [f"Here are the rows where {name}'s prediction differs most from the real attention (top {top} keys "
             "each), on the text it fits best and the text it fits worst."]
    for title, fit in (("Best fit", best_fit), ("Worst fit", worst_fit)):
        lines += ["", f"### {title} (JSD {fit.jsd:.3f})",
                  "Tokens: " + " ".join(f"[{i}]{t!r}" for i, t in enumerate(fit.tokens)),
                  contrast_rows(fit.tokens, fit.real, fit.predicted, n_rows, top)]
    return lines


# ---- the hybrid turn (synthesis.llm.hybrid) ----

def hybrid_prompt(examples: list[tuple[list[str], np.ndarray]], name: str, source: str, jsd: float,
                  best_fit: FitExample, worst_fit: FitExample, settings: dict) -> str:
    """One user turn: the head's edges, the offline fit's program for it with its fit, and the request for one
    program that improves on it (one: the programs are long, and output tokens are what a local model pays most
    for)."""
    head = head_prompt(examples, settings).rsplit("\n\n", 1)[0]  # the edges, without head_prompt's request
    return "\n\n".join([
        head,
        f"An automatic fit of weighted readable cues (no LLM) wrote this program, {name}, for the head. Its mean "
        f"Jensen-Shannon distance to the head on the synthesis texts is {jsd:.3f} (0 = identical, 1 = nothing in "
        f"common).\n\n```python\n{source.rstrip()}\n```",
        "\n".join(fit_contrasts(name, best_fit, worst_fit, settings)),
        f"Write one program that improves on {name}: keep what it gets right, fix the mistakes above, and make it "
        "easier to read where you can (a rule in place of a weighted sum is welcome if it fits as well). Put it in "
        "a single ```python block, with one sentence before it naming the change."])


# ---- parsing replies ----

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n")


@dataclass
class ProgramText:
    code: str
    truncated: bool  # the reply ended inside this code block (it hit max_tokens)


# The two imports every program may need, as the system prompt's format writes them. Small code models often
# leave one out; without it a program that is otherwise right fails on its first line.
STANDARD_IMPORTS = (("np", re.compile(r"^\s*import numpy as np\b", re.M), "import numpy as np"),
                    ("h", re.compile(r"^\s*from attnprog import helpers as h\b", re.M), "from attnprog import helpers as h"))


def add_missing_imports(code: str) -> str:
    """`code` with `import numpy as np` / `from attnprog import helpers as h` put first (under a comment saying
    so) where it uses `np.` / `h.` without importing it; unchanged otherwise."""
    missing = [line for name, imported, line in STANDARD_IMPORTS
               if re.search(rf"(?<![\w.]){name}\.\w", code) and not imported.search(code)]
    if not missing:
        return code
    return "\n".join(["# attnprog added the import(s) this program uses without importing:", *missing, "", code])


def extract_programs(reply: str) -> list[ProgramText]:
    """The Python code blocks of a reply, in order. A block left open at the end (a reply cut off by the
    token limit) is returned marked truncated; a reply with no fences but a `def attention` is taken whole."""
    programs, position = [], 0
    while True:
        opening = FENCE.search(reply, position)
        if opening is None:
            break
        language = opening.group(1).lower()
        closing = reply.find("```", opening.end())
        code = reply[opening.end(): closing if closing >= 0 else len(reply)]
        if language in ("", "python", "py", "python3"):
            programs.append(ProgramText(code.strip("\n") + "\n", truncated=closing < 0))
        if closing < 0:
            break
        position = closing + 3
    if not programs and "def attention" in reply:
        programs.append(ProgramText(reply.strip("\n") + "\n", truncated=False))
    return programs
