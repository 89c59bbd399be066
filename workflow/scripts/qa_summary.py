from attnprog.qa import summarise_qa

summarise_qa(list(snakemake.input), snakemake.output[0])
