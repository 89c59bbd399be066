"""The HTML report: a folder a person opens from disk (no network, no CDN) that stays fast with 700+ heads.

    results/report/index.html                     the models side by side, a link to each
    results/report/{model}/index.html             overview: IoU and category per head, baselines, perplexity, QA
    results/report/{model}/heads/L{l}H{h}.html    one small page per head: real vs program attention, source

Every page is one file that renders alone (Snakemake's --report embeds single files): plots are inline SVG,
the overview's layer x head maps are SVG whose cells link to the head pages, and a head page carries its own
attention maps as small PNG data URIs inside SVG (token labels stay text). With 700+ heads the overview stays
light because the attention maps live only on the head pages. Every figure says which split it comes from:
test, unless it says otherwise.

    data.py      what the report reads (the files its rules name, through their contracts)
    figures.py   SVG and matplotlib pictures
    pages.py     one model's overview and head pages
    index.py     the cross-model index
"""
from .data import ModelInputs, ReportError
from .index import ModelSummary, write_index
from .pages import write_model_report

__all__ = ["ModelInputs", "ModelSummary", "ReportError", "write_index", "write_model_report"]
