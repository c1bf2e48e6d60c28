# Shared body of the sbatch scripts (sourced, not run): container, NCCL/IB environment, logs,
# requeue on preemption, and one `srun` task per node that runs launch/torchrun.sh.
#
# Inputs (environment): CMD (set by the sbatch script), CONFIG, R1M_IMAGE, MOUNTS, REPO, SHARED,
# NPROC_PER_NODE, CPUS_PER_TASK, MASTER_PORT, PREFLIGHT, DRY_RUN; extra arguments go to the command
# (key=value overrides of the config, or what convert.sbatch builds).

if [[ "$CMD" != convert || "${DRY_RUN:-0}" == 1 ]]; then
  : "${CONFIG:?set CONFIG (e.g. sbatch --export=ALL,CONFIG=configs/dsv3_671b_grpo_256xh100.yaml ...)}"
fi
# The image built from launch/container/Dockerfile (NGC PyTorch + pinned vLLM, megatron-core, this
# package): a registry tag or an enroot .sqsh file. The bare NGC image lacks our dependencies.
: "${R1M_IMAGE:?set R1M_IMAGE to the image built from launch/container/Dockerfile (a tag, or the .sqsh of enroot import)}"
REPO=${REPO:-$SLURM_SUBMIT_DIR}                  # this checkout, on storage every node sees
SHARED=${SHARED:-$REPO}                           # shared storage for checkpoints and logs
MOUNTS=${MOUNTS:-$REPO:$REPO,$SHARED:$SHARED}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
# All of the node's CPUs for its one task: since Slurm 22.05 srun does not inherit --cpus-per-task
# from sbatch, and a task left at 1 CPU puts 8 ranks, their data loading, the reward pool and vLLM's
# scheduler on one core.
CPUS_PER_TASK=${CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:?set CPUS_PER_TASK (SLURM_CPUS_ON_NODE is unset)}}
MASTER_PORT=${MASTER_PORT:-29500}
# `r1m doctor --require-gpu` on every node before torchrun: a wrong image or a node without GPUs
# fails in seconds with the reason instead of inside the first collective.
export PREFLIGHT=${PREFLIGHT:-1}
# The image's interpreter: a .venv in the mounted checkout (a CPU venv from launch/setup_env.sh) must not
# be picked up by launch/torchrun.sh inside the container.
export R1M_PYTHON=${R1M_PYTHON:-python3}

if [[ -n "${CONFIG:-}" ]]; then
  RUN_NAME=${RUN_NAME:-$(basename "${CONFIG%.yaml}")}
else
  RUN_NAME=${RUN_NAME:-convert-$(basename "${OUT_DIR:-out}")}
fi
RUN_DIR=${RUN_DIR:-$SHARED/runs/$RUN_NAME}
CKPT_DIR=${CKPT_DIR:-$RUN_DIR/checkpoints}        # the same directory across requeues: resume reads latest
LOG_DIR=${LOG_DIR:-$RUN_DIR/logs/job-$SLURM_JOB_ID}
mkdir -p "$LOG_DIR" "$CKPT_DIR"

# The first node of the allocation hosts the c10d rendezvous store.
# (mapfile, not `| head -n 1`: head closing the pipe early kills scontrol with SIGPIPE under pipefail)
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${hosts[0]:?scontrol returned no hosts for $SLURM_JOB_NODELIST}
export CONFIG="${CONFIG:-}" CMD NPROC_PER_NODE MASTER_ADDR MASTER_PORT LOG_DIR
export NNODES=$SLURM_JOB_NUM_NODES
export RDZV_ID=$SLURM_JOB_ID

# --- NCCL / InfiniBand (H100 nodes with 8 GPUs on NVLink and one IB HCA per GPU) ---
# Errors surface as exceptions instead of hangs, and a stuck collective aborts the job (then requeue).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Megatron overlaps TP/EP communication with compute only with a single CUDA work queue.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# GPUDirect RDMA between GPU memory and the HCA on the same PCIe switch (the H100 topology).
export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-PHB}
# IB rather than the Ethernet management NIC for inter-node traffic; RoCE fabrics also need
# NCCL_IB_GID_INDEX (usually 3). Set NCCL_IB_HCA to the cluster's HCA names when they are not mlx5_*.
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}
# NCCL's bootstrap uses this interface; exclude loopback and docker bridges (NCCL's `^` syntax).
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}
# GLOO_SOCKET_IFNAME stays unset (gloo then uses the address of the node's hostname): gloo has no `^`
# syntax and copying the NCCL value kills every job at its first gloo group. A value given by the
# user is passed on; launch/torchrun.sh turns an exclusion into the one interface routing to the master.
# IB retransmit timeout 2^22 us; the default gives up too early on large congested all-to-alls.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# NVLS (NVLink SHARP) buffers cost GPU memory per communicator and the colocated vLLM engine creates
# its own communicators; verl's DeepSeek-V3 recipe turns it off for the same reason.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# Print NCCL's topology and transport choice once per rank: WARN by default, INFO to debug a hang.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# $HOME is not mounted in the container (--no-container-mount-home below): the caches that default
# under it (vLLM's and HF's ~/.cache, triton's ~/.triton) go to the node's local /tmp instead.
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/r1m-cache-$SLURM_JOB_ID}
export TRITON_HOME=${TRITON_HOME:-$XDG_CACHE_HOME}
# vLLM as a library inside the trainer process, sharing the GPU (docs/architecture.md#rollout-placement).
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}

# Preemption / time limit: Slurm sends USR1 (see --signal in the sbatch header); requeue this job.
# The requeued job runs this script again and checkpoint.resume=true picks up $CKPT_DIR/latest, so
# at most checkpoint.save_every steps are lost.
requeue() {
  echo "r1m: caught SIGUSR1 at $(date -Is); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

echo "r1m: job $SLURM_JOB_ID ($CMD) on $NNODES nodes x $NPROC_PER_NODE GPUs, rendezvous $MASTER_ADDR:$MASTER_PORT"
echo "r1m: config ${CONFIG:-none}; checkpoints $CKPT_DIR; logs $LOG_DIR; image $R1M_IMAGE; dry run ${DRY_RUN:-0}"

overrides=("$@")
if [[ "$CMD" == train || "$CMD" == sft ]]; then
  overrides=("checkpoint.dir=$CKPT_DIR" "logging.run_dir=$RUN_DIR" "${overrides[@]}")
fi

# srun in the background so the USR1 trap can run while the step is alive.
# --no-container-mount-home: pyxis mounts $HOME by default, and ~/.local or ~/.cache there would shadow
# the image's packages and compile caches.
srun --ntasks-per-node=1 --nodes="$NNODES" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 \
  --container-image="$R1M_IMAGE" --container-mounts="$MOUNTS" --container-workdir="$REPO" \
  --no-container-mount-home \
  --output="$LOG_DIR/node-%N.out" --error="$LOG_DIR/node-%N.err" \
  bash launch/torchrun.sh "${overrides[@]}" &
step=$!
status=0
wait "$step" || status=$?
# A trapped USR1 interrupts `wait` (status > 128); wait again for the step that Slurm is stopping.
if (( status > 128 )); then
  status=0
  wait "$step" || status=$?
fi
exit "$status"
