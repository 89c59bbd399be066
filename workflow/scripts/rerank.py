"""Per-head job `rerank`: run one head's candidates once on every split and score them (run by its rule as a
plain command, with named arguments: see SCRIPTS in workflow/rules/common.smk)."""
import argparse

from attnprog.contracts import HeadId, ModelInfo
from attnprog.joblog import log_to
from attnprog.rerank import rerank_head

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--layer", type=int, required=True)
parser.add_argument("--head", type=int, required=True)
parser.add_argument("--candidates", required=True, help="the head's synthesis folder")
parser.add_argument("--head-inputs", required=True)
parser.add_argument("--info", required=True)
parser.add_argument("--causal-check-examples", type=int, default=2)
parser.add_argument("--out", required=True)
parser.add_argument("--log", required=True)
args = parser.parse_args()

log_to([args.log])
info = ModelInfo.read(args.info)
rerank_head(args.candidates, args.head_inputs, HeadId(args.layer, args.head), args.out,
            tokenizer_dir=info.tokenizer_dir, is_causal=info.is_causal,
            causal_check_examples=args.causal_check_examples)
