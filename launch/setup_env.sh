#!/usr/bin/env bash
# Builds .venv on a fresh CPU machine. Idempotent: a second run only re-checks.
# Order matters: the CPU torch 2.13.0 goes in first so that nothing later pulls a CUDA build,
# and the CUDA-linked torchvision/torchaudio/torchcodec that vLLM drags in are removed at the end
# (they break `import transformers` model classes and `from vllm import LLM`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
pip install -q -e ".[test,rollout-cpu]"
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# bubblewrap isolates the code sandbox when the OS allows it; the sandbox falls back (and says so) without it.
if ! command -v bwrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq bubblewrap >/dev/null 2>&1 || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1)) || echo "setup: bubblewrap not installed; sandbox uses its fallback"
fi
# r1_megatron first: it filters megatron-core's known import warnings (r1_megatron/__init__.py).
python -c "import r1_megatron, torch, megatron.core, vllm; print('setup ok: torch', torch.__version__, 'mcore', megatron.core.__version__, 'vllm', vllm.__version__)"
