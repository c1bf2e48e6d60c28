#!/usr/bin/env bash
# Starts `r1m $CMD $CONFIG [key=value ...]` on this node under torchrun. The Slurm scripts run it once
# per node (one task per node); by hand it runs single-node jobs.
#
#   CONFIG=configs/micro_moe_sft.yaml NPROC_PER_NODE=4 DRY_RUN=1 launch/torchrun.sh parallel.tp=2 parallel.pp=2
#
# Environment (defaults in brackets):
#   CONFIG          job config (required, except for CMD=convert, whose arguments say everything)
#   CMD             r1m subcommand [train]; DRY_RUN=1 replaces it with `validate`, which loads the config,
#                   checks the layout against the world size and prints the plan, without training
#   NNODES [1]  NPROC_PER_NODE [8]  MASTER_ADDR [127.0.0.1]  MASTER_PORT [29500]
#                   c10d rendezvous on MASTER_ADDR:MASTER_PORT (the first node under Slurm)
#   RDZV_ID         rendezvous id [SLURM_JOB_ID, else r1m-$USER]: keeps two jobs on one host apart
#   LOG_DIR         when set, torchrun writes every rank's stdout/stderr under $LOG_DIR/ranks/
#   PREFLIGHT [0]   1: run `r1m doctor --require-gpu` first and stop on any failed check (the sbatch
#                   scripts set it)
#   R1M_PYTHON      the interpreter [the checkout's .venv/bin/python when there is one, else python3]
#   TORCHRUN        the launcher command [$R1M_PYTHON -m torch.distributed.run]
#   GLOO_SOCKET_IFNAME  as gloo reads it: interface names. An NCCL-style exclusion ("^lo,docker0") is
#                   turned into the one interface that routes to MASTER_ADDR (see gloo_interface)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-r1m-${USER:-local}}}
CMD=${CMD:-train}
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  CMD=validate
fi
# The project's interpreter when there is one, so that no activated venv is needed; in the container
# (no .venv) the image's python3.
if [[ -z "${R1M_PYTHON:-}" ]]; then
  R1M_PYTHON=python3
  [[ -x "$ROOT/.venv/bin/python" ]] && R1M_PYTHON=$ROOT/.venv/bin/python
fi
if [[ -n "${TORCHRUN:-}" ]]; then
  read -r -a launcher <<< "$TORCHRUN"
else
  launcher=("$R1M_PYTHON" -m torch.distributed.run)
fi

# Interfaces whose names start with one of the comma-separated prefixes in $1 are excluded (NCCL's
# `^` semantics). Prints the interface of the route to MASTER_ADDR, else of the default route, when
# not excluded; prints nothing when neither qualifies.
gloo_interface() {
  local -a excluded candidates=()
  IFS=, read -r -a excluded <<< "$1"
  local addr dev
  addr=$(getent ahostsv4 "$MASTER_ADDR" 2>/dev/null | awk 'NR == 1 {print $1}') || true
  if [[ -n "$addr" ]] && command -v ip >/dev/null; then
    dev=$(ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n 1) || true
    [[ -n "$dev" ]] && candidates+=("$dev")
  fi
  # /proc/net/route: Iface Destination ...; the default route has destination 00000000.
  if [[ -r /proc/net/route ]]; then
    dev=$(awk 'NR > 1 && $2 == "00000000" {print $1; exit}' /proc/net/route)
    [[ -n "$dev" ]] && candidates+=("$dev")
  fi
  local c e
  for c in "${candidates[@]}"; do
    for e in "${excluded[@]}"; do
      [[ -n "$e" && "$c" == "$e"* ]] && continue 2
    done
    echo "$c"
    return 0
  done
  return 0
}

# Gloo (megatron-core's CPU-side groups, `r1m validate`) splits GLOO_SOCKET_IFNAME on commas and opens
# each name as an interface: it has no `^` exclusion, and "^lo,docker0" fails the first gloo group.
if [[ "${GLOO_SOCKET_IFNAME:-}" == ^* ]]; then
  iface=$(gloo_interface "${GLOO_SOCKET_IFNAME#^}")
  if [[ -n "$iface" ]]; then
    echo "r1m: GLOO_SOCKET_IFNAME=$iface (the route to $MASTER_ADDR; gloo cannot read '$GLOO_SOCKET_IFNAME')"
    export GLOO_SOCKET_IFNAME=$iface
  else
    echo "r1m: no interface outside '$GLOO_SOCKET_IFNAME' routes to $MASTER_ADDR; GLOO_SOCKET_IFNAME unset (gloo uses the hostname's address)"
    unset GLOO_SOCKET_IFNAME
  fi
fi

if [[ "${PREFLIGHT:-0}" == 1 ]]; then
  if ! "$R1M_PYTHON" -m r1_megatron.cli doctor --require-gpu; then
    echo "r1m: preflight failed on $(hostname): the FAILED lines above name each missing piece" >&2
    exit 1
  fi
fi

# `convert` takes its direction and directories as arguments; every other command takes the config.
if [[ "$CMD" == convert ]]; then
  cli_args=("$@")
else
  : "${CONFIG:?set CONFIG to a job config, e.g. CONFIG=configs/dsv3_671b_grpo_256xh100.yaml}"
  cli_args=("$CONFIG" "$@")
fi

log_args=()
if [[ -n "${LOG_DIR:-}" ]]; then
  mkdir -p "$LOG_DIR/ranks"
  # --redirects 3 sends each rank's stdout and stderr to files; --tee 3 still shows them on the console.
  log_args=(--log-dir="$LOG_DIR/ranks" --redirects=3 --tee=3)
fi

# One failed rank ends the job at once (no elastic restarts): Slurm's requeue plus checkpoint resume
# is the recovery path, and torchrun's restarts would re-run from the same broken state.
exec "${launcher[@]}" \
  --nnodes="$NNODES" \
  --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id="$RDZV_ID" \
  --max-restarts=0 \
  "${log_args[@]}" \
  -m r1_megatron.cli "$CMD" "${cli_args[@]}"
