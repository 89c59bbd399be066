"""Rule report_model: one model's overview and head pages."""
from pathlib import Path

from attnprog.contracts import HeadId
from attnprog.joblog import log_to
from attnprog.report import ModelInputs, write_model_report
from attnprog.settings import ReportSettings

log_to(snakemake.log)
i = snakemake.input
heads = [HeadId(*h) for h in snakemake.params.heads]
inputs = ModelInputs(info=Path(i.info), head_inputs=Path(i.head_inputs), programs=Path(i.programs),
                     program_files=Path(i.program_files), scores=Path(i.scores), best=Path(i.best),
                     baselines=Path(i.baselines), library=Path(i.library),
                     rerank=dict(zip(heads, map(Path, i.rerank))), sweep=Path(i.sweep),
                     single=Path(i.single), substitution=Path(i.substitution),
                     qa=Path(i.qa) if "qa" in i.keys() else None,
                     explainers=Path(i.explainers) if "explainers" in i.keys() else None)
write_model_report(inputs, Path(snakemake.output.overview).parent, ReportSettings.from_config(snakemake.params.options),
                   name=snakemake.wildcards.model)
