"""Rule transfer: one model's library scored on another model's heads."""
from attnprog.joblog import log_to
from attnprog.library.transfer import transfer

log_to(snakemake.log)
i = snakemake.input
result = transfer(i.program_files, i.programs, i.head_inputs, i.best, i.info, snakemake.wildcards.source)
print(f"{result.library_model} -> {result.target_model}: mean test IoU {result.mean_test_iou:.3f} "
      f"(own library {result.own_mean_test_iou:.3f}); {result.universal_heads} of {result.n_heads} heads "
      "within the margin of their own program")
result.write(snakemake.output[0])
