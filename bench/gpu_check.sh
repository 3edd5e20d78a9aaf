#!/usr/bin/env bash
# One GPU check, no network: bash bench/gpu_check.sh [--device cpu] [bench/gpu_check.py options]
#
# Needs torch (with CUDA), transformers, peft, pyarrow and tokenizers; installs whatever else the check
# imports (dpo_zoo, deepspeed, omegaconf, datasets, trl and their needs) from ./wheelhouse, built
# beforehand where PyPI can be reached with `make wheelhouse`, with pip --no-index (never an index, never
# torch). When those packages already import, the install is skipped. Prints ONE JSON object on stdout;
# progress goes to stderr. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false DS_BUILD_OPS=0

if ! "$PY" -c "import torch, transformers, peft, pyarrow, tokenizers" 2>/dev/null; then
  echo "[gpu-check] $PY lacks one of torch, transformers, peft, pyarrow, tokenizers (the machine's own packages)" >&2
  exit 2
fi
if ! "$PY" -c "import deepspeed, omegaconf, datasets, dpo_zoo" 2>/dev/null; then
  if [ ! -f wheelhouse/requirements.txt ]; then
    echo "[gpu-check] deepspeed/omegaconf/datasets/dpo_zoo are missing and there is no ./wheelhouse: run" \
         "\`make wheelhouse\` where PyPI can be reached and copy the folder here" >&2
    exit 2
  fi
  echo "[gpu-check] installing from ./wheelhouse (no index)" >&2
  "$PY" -m pip install -q --no-index --find-links wheelhouse -r wheelhouse/requirements.txt >&2 || {
    # TRL may ask for a newer transformers than the machine has: then the check runs without it
    # ("trl not available" in the JSON) rather than not at all.
    echo "[gpu-check] the full install failed; retrying without trl" >&2
    grep -v '^trl==' wheelhouse/requirements.txt > "${TMPDIR:-/tmp}/gpu_check_requirements.txt"
    "$PY" -m pip install -q --no-index --find-links wheelhouse -r "${TMPDIR:-/tmp}/gpu_check_requirements.txt" >&2
  }
fi
if [[ " $* " == *" --device cpu "* ]]; then export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""; else export DS_ACCELERATOR=cuda; fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec timeout "${GPU_CHECK_TIMEOUT_S:-480}" "$PY" bench/gpu_check.py "$@"
