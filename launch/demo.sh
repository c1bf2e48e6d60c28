#!/usr/bin/env bash
# Sets everything up (launch/setup_env.sh) and runs the tiny CPU GRPO demo (configs/demo_cpu.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/r1m demo "$@"
