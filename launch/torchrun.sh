#!/usr/bin/env bash
# Starts `r1m $CMD $CONFIG [key=value ...]` on this node under torchrun. The Slurm scripts run it once
# per node (one task per node); by hand it runs single-node jobs.
#
#   CONFIG=configs/micro_moe_sft.yaml NPROC_PER_NODE=4 DRY_RUN=1 launch/torchrun.sh parallel.tp=2 parallel.pp=2
#
# Environment (defaults in brackets):
#   CONFIG          job config (required)
#   CMD             r1m subcommand [train]; DRY_RUN=1 replaces it with `validate`, which loads the config,
#                   checks the layout against the world size and prints the plan, without training
#   NNODES [1]  NPROC_PER_NODE [8]  MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]
#                   c10d rendezvous on MASTER_ADDR:MASTER_PORT (the first node under Slurm)
#   RDZV_ID         rendezvous id [SLURM_JOB_ID, else r1m-$USER]: keeps two jobs on one host apart
#   LOG_DIR         when set, torchrun writes every rank's stdout/stderr under $LOG_DIR/ranks/
#   TORCHRUN        the torchrun executable [torchrun]
set -euo pipefail

: "${CONFIG:?set CONFIG to a job config, e.g. CONFIG=configs/dsv3_671b_grpo_256xh100.yaml}"
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-r1m-${USER:-local}}}
TORCHRUN=${TORCHRUN:-torchrun}
CMD=${CMD:-train}
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  CMD=validate
fi

log_args=()
if [[ -n "${LOG_DIR:-}" ]]; then
  mkdir -p "$LOG_DIR/ranks"
  # --redirects 3 sends each rank's stdout and stderr to files; --tee 3 still shows them on the console.
  log_args=(--log-dir="$LOG_DIR/ranks" --redirects=3 --tee=3)
fi

# One failed rank ends the job at once (no elastic restarts): Slurm's requeue plus checkpoint resume
# is the recovery path, and torchrun's restarts would re-run from the same broken state.
exec "$TORCHRUN" \
  --nnodes="$NNODES" \
  --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id="$RDZV_ID" \
  --max-restarts=0 \
  "${log_args[@]}" \
  -m r1_megatron.cli "$CMD" "$CONFIG" "$@"
