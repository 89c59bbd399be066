"""Each head's program from the library, as a replacement the mechanism can call."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from ..contracts import BEST, PROGRAMS, HeadId
from ..programs import ProgramError, load_programs
from ..runner import ProgramRunner
from .mechanism import uniform_attention

class UniformOnFailure:
    """A program runner that, where the program fails on an example, uses the uniform matrix and counts the
    failure: a failing program costs the model what the baseline costs, and never stops the sweep."""

    def __init__(self, runner: ProgramRunner):
        self.runner, self.failures = runner, 0

    def many(self, examples: list[list[str]]) -> list[np.ndarray]:
        try:
            return self.runner.many(examples)
        except ProgramError:
            out = []
            for tokens in examples:
                try:
                    out.append(self.runner(tokens))
                except ProgramError:
                    self.failures += 1
                    out.append(uniform_attention(tokens))
            return out

    def __call__(self, tokens: list[str]) -> np.ndarray:
        return self.many([tokens])[0]


def read_best(best_path) -> pd.DataFrame:
    """best.parquet, heads without a program dropped, best val IoU first."""
    best = BEST.read(best_path)
    best = best[best.program.notna()]
    return best.sort_values(["val_iou", "layer", "head"], ascending=[False, True, True]).reset_index(drop=True)


def program_replacements(program_dir, programs_path, best: pd.DataFrame, tokenizer_dir=None,
                         noncausal: str = "prefixwise", log=print) -> dict[HeadId, UniformOnFailure]:
    """Each head's program (library/programs/ and programs.parquet) as a cached runner. A program that failed
    the causality check runs prefix by prefix (row i from tokens[:i+1] only) or, with noncausal="skip", its
    head is never replaced."""
    table = PROGRAMS.read(programs_path).set_index("name")
    loaded = {p.name: p for p in load_programs(program_dir)}
    runners, out, skipped = {}, {}, 0
    for row in best.itertuples():
        if row.program not in loaded or row.program not in table.index:
            head = HeadId(int(row.layer), int(row.head))
            raise ValueError(f"library: program '{row.program}' of {head} is not in {program_dir} and {programs_path}")
        causal = bool(table.loc[row.program, "causal"])
        if not causal and noncausal == "skip":
            skipped += 1
            continue
        if row.program not in runners:
            program = dataclasses.replace(loaded[row.program], trusted=bool(table.loc[row.program, "trusted"]))
            runners[row.program] = UniformOnFailure(ProgramRunner(program, prefixwise=not causal,
                                                                  tokenizer_dir=tokenizer_dir))
        out[HeadId(int(row.layer), int(row.head))] = runners[row.program]
    n_prefixwise = sum(r.runner.prefixwise for r in runners.values())
    log(f"substitution: {len(runners)} programs for {len(out)} heads; {n_prefixwise} non-causal programs run "
        f"prefix by prefix; {skipped} heads skipped as non-causal")
    return out


def tuned_replacements(tuned_dir, fraction: float, programs: dict[HeadId, UniformOnFailure], tokenizer_dir=None
                       ) -> dict[HeadId, UniformOnFailure]:
    """The `tuned` method's programs at one fraction of the sweep (substitution/tuned: heads.parquet and the
    files it names), over `programs` (each head's library program, which the heads that were not tuned keep).
    A tuned program has its library program's cues, so it is causal and trusted as that program is."""
    import json
    from pathlib import Path

    from ..contracts import TUNED

    tuned_dir = Path(tuned_dir)
    stages = json.loads((tuned_dir / "stages.json").read_text())
    if not any(abs(float(s["fraction"]) - fraction) < 1e-9 for s in stages):
        raise ValueError(f"tuned programs: {tuned_dir} has no stage at fraction {fraction:g} (its stages: "
                         f"{', '.join(format(float(s['fraction']), 'g') for s in stages)})")
    rows = TUNED.read(tuned_dir / "heads.parquet")
    out = dict(programs)
    for row in rows[(rows.fraction - fraction).abs() < 1e-9].itertuples():
        head = HeadId(int(row.layer), int(row.head))
        untuned = programs[head].runner.program
        program = dataclasses.replace(load_programs(tuned_dir / row.file)[0], trusted=untuned.trusted)
        out[head] = UniformOnFailure(ProgramRunner(program, tokenizer_dir=tokenizer_dir))
    return out
