#!/usr/bin/env bash
# One-command GPU smoke check, for a machine with one or more CUDA GPUs (budget: under 10 minutes on
# one H100; each step has its own time limit and the limits add up to 570 s, 9.5 minutes, leaving the
# doctor, the port pick and the report half a minute).
#
#   bash launch/gpu_check.sh [OUT_DIR]        # default runs/gpu_check; the report is OUT_DIR/report.json
#
# R1M_PYTHON picks the interpreter [the checkout's .venv/bin/python when there is one, else python3]; in
# the image of launch/container/Dockerfile set R1M_PYTHON=python3 if the mounted checkout has a CPU .venv.
#
# NEVER RUN YET: written against the GPU code paths without a GPU to run it on. Nothing in it counts as
# measured until someone runs it and reads the report.
#
# Steps (each one's exit code, wall time, log and key output lines go into the report):
#   doctor     `r1m doctor --require-gpu` (refuses at once, with the reasons, on a machine without a
#              CUDA device or without the pinned stack: nothing else runs and no report is written)
#   pytest     the `gpu`-marked tests of tests/unit (no engine, fast), then tests/parity (CUDA vLLM
#              engines, transformers references: the slow ones, last), 150 s per test unless a test
#              sets its own limit (the step's limit bounds them all; -rA lists each result). The
#              gpu tests of tests/dist do not fit this budget and run by hand: the resume test allows
#              itself 540 s, the NCCL transport test needs 2 GPUs (`pytest -m gpu tests/dist`)
#   grpo       3 GRPO steps of tiny_moe (configs/demo_cpu.yaml) on CUDA in bf16 through launch/torchrun.sh
#              (1 rank, NCCL): colocated vLLM with sleep/wake, refit and the canary after every refit,
#              offload; model.dtype=bfloat16 is the trainer's dtype (the default `auto` is bf16 on CUDA too)
#   bench_train_step, bench_rollout   bench/train_step.py and bench/rollout.py, short settings
#   bench_speculative   bench/speculative.py: MTP self-speculation against plain decoding (greedy
#              identical, sampled-logprob gap, acceptance, break-even acceptance, RATIO spec_vs_plain)
#
# Exit code: 2 when refused, 1 when any step failed, 0 when all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
if [[ -z "${R1M_PYTHON:-}" ]]; then
  R1M_PYTHON=python3
  [[ -x .venv/bin/python ]] && R1M_PYTHON=.venv/bin/python
fi
export R1M_PYTHON VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false

doctor_out=$("$R1M_PYTHON" -m r1_megatron.cli doctor --require-gpu 2>&1)
if [[ $? -ne 0 ]]; then
  echo "gpu_check: refusing to run: this machine fails the GPU preflight (r1m doctor --require-gpu):" >&2
  grep "FAILED" <<< "$doctor_out" >&2 || echo "$doctor_out" >&2
  exit 2
fi

mkdir -p "$OUT/steps"
rm -f "$OUT"/steps/*
printf '%s\n' "$doctor_out" > "$OUT/steps/00-doctor.log"
printf '0\n0\n' > "$OUT/steps/00-doctor.status"
echo "r1m doctor --require-gpu" > "$OUT/steps/00-doctor.cmd"
echo "GPU path|CUDA|NCCL|vLLM|transformer-engine|megatron-core|torch" > "$OUT/steps/00-doctor.keys"

n=0
# step NAME SECONDS KEY_REGEX COMMAND...: runs COMMAND under `timeout`, logs to OUT/steps/NN-NAME.log
step() {
  local name=$1 limit=$2 keys=$3
  shift 3
  n=$((n + 1))
  local base
  base=$(printf '%s/steps/%02d-%s' "$OUT" "$n" "$name")
  printf '%q ' "$@" > "$base.cmd"
  echo "$keys" > "$base.keys"
  echo "gpu_check: [$n] $name (limit ${limit}s): $*"
  local start end rc
  start=$(date +%s.%N)
  timeout --kill-after=20 "$limit" "$@" > "$base.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  printf '%s\n%s\n' "$rc" "$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", b - a}')" > "$base.status"
  echo "gpu_check: [$n] $name exit $rc"
}

step pytest 240 "passed|failed|error|skipped|PASSED|FAILED|ERROR|SKIPPED|s call" \
  "$R1M_PYTHON" -m pytest -q -m gpu -p no:cacheprovider --timeout=150 -rA --durations=0 tests/unit tests/parity

port=$("$R1M_PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
step grpo 180 "step|canary|refit|held-out|accuracy|Error|error" \
  env CONFIG=configs/demo_cpu.yaml CMD=train NPROC_PER_NODE=1 MASTER_PORT="$port" bash launch/torchrun.sh \
  parallel.device=cuda parallel.backend=nccl model.dtype=bfloat16 rollout.dtype=bfloat16 \
  optim.distributed_optimizer=true rl.share_prompts=false rl.steps=3 rl.eval_every=0 \
  rl.prompts_per_step=8 rl.group_size=8 data.num_eval=16 rollout.gpu_memory_utilization=0.3 \
  offload.enabled=true checkpoint.save_every=0 logging.run_dir="$OUT/grpo" logging.progress=false \
  logging.tensorboard=false

step bench_train_step 50 "RATIO|device|logit|median" \
  "$R1M_PYTHON" bench/train_step.py --steps 3

step bench_rollout 60 "RATIO|check:|median|shape" \
  "$R1M_PYTHON" bench/rollout.py --repeats 2

step bench_speculative 40 "RATIO|RESULT|costs|shape" \
  "$R1M_PYTHON" bench/speculative.py --k 1

"$R1M_PYTHON" - "$OUT" <<'EOF'
"""Collects OUT/steps/* into OUT/report.json and prints one line per step."""
import json
import platform
import re
import sys
import time
from pathlib import Path

out = Path(sys.argv[1])
steps = []
for status in sorted((out / "steps").glob("*.status")):
    base = status.with_suffix("")
    rc, seconds = status.read_text().split()
    log = base.with_suffix(".log").read_text(errors="replace").splitlines()
    keys = re.compile(base.with_suffix(".keys").read_text().strip())
    steps.append({
        "name": base.name.split("-", 1)[1],
        "command": base.with_suffix(".cmd").read_text().strip(),
        "exit_code": int(rc),
        "timed_out": int(rc) in (124, 137),
        "wall_s": float(seconds),
        "log": str(base.with_suffix(".log")),
        "key_lines": [line for line in log if keys.search(line)][-20:],
        "last_lines": log[-5:],
    })
report = {
    "host": platform.node(),
    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "ok": all(s["exit_code"] == 0 for s in steps),
    "steps": steps,
}
(out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
for s in steps:
    print(f"gpu_check: {s['name']:<17} exit {s['exit_code']:<4} {s['wall_s']:7.1f} s")
print(f"gpu_check: report {out / 'report.json'}; {'all steps passed' if report['ok'] else 'FAILED'}")
sys.exit(0 if report["ok"] else 1)
EOF
