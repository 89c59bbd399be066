"""Rule report: the cross-model index."""
from attnprog.contracts import TransferSummary
from attnprog.joblog import log_to
from attnprog.report import ModelSummary, write_index
from attnprog.settings import ReportSettings

log_to(snakemake.log)
i = snakemake.input
models = [ModelSummary.read(name, i.info[k], i.library[k], i.best[k], i.sweep[k], i.substitution[k],
                            i.qa[k] if "qa" in i.keys() else None)
          for k, name in enumerate(snakemake.params.models)]
write_index(models, snakemake.output[0], ReportSettings.from_config(snakemake.params.options),
            transfers=[TransferSummary.read(path) for path in i.transfer])
