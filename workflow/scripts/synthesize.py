"""Per-head job `synthesize`: candidate programs for one head (run by its rule as a plain command, with named
arguments: see SCRIPTS in workflow/rules/common.smk)."""
import argparse
import json

from attnprog.contracts import HeadId
from attnprog.joblog import log_to
from attnprog.synthesize import synthesize_head

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True)
parser.add_argument("--layer", type=int, required=True)
parser.add_argument("--head", type=int, required=True)
parser.add_argument("--settings", required=True, help="the config's synthesis section, as JSON")
parser.add_argument("--head-inputs", required=True)
parser.add_argument("--features", help="the offline synthesizer's primitives (offline backend only)")
parser.add_argument("--out", required=True)
parser.add_argument("--log", required=True)
args = parser.parse_args()

log_to([args.log])
synthesize_head(json.loads(args.settings), args.model, HeadId(args.layer, args.head), args.head_inputs, args.out,
                args.features)
