"""r1-megatron: DeepSeek-R1 GRPO on megatron-core."""

import warnings

# Every import of megatron-core and vLLM by this package passes through here first. Without
# transformer-engine and apex (always so on CPU; docs/cpu_platform.md) megatron-core 0.16.1 warns at
# import, from five modules, that it falls back to torch implementations; the fallbacks are what the
# CPU path is built on (parallel/compat_cpu.py), and `r1m doctor` reports what is installed. Its own
# default `cuda_graph_scope="full"` warns at every model build. Only these exact messages are silenced.
for _message, _category in (
    ("Transformer Engine and Apex are not installed", UserWarning),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning),
    ("full scope is deprecated", UserWarning),
    # Under sequence parallelism, megatron's expert linears at expert-TP 1 turn it off for themselves
    # (what MoE with parallel.etp=1 wants) and say so, once per layer and rank.
    ("`sequence_parallel` is set to `True`, but tensor model parallel size is 1", UserWarning),
    # megatron's tensor-parallel layers advise CUDA_DEVICE_MAX_CONNECTIONS=1 under sequence parallelism,
    # for CUDA stream overlap: nothing to act on on CPU, and the GPU launch (launch/slurm/common.sh) sets it.
    ("When using sequence parallelism it is recommended to set the environment variable "
     "CUDA_DEVICE_MAX_CONNECTIONS", UserWarning),
    # vLLM 0.32's kernel dispatcher reads every attribute of torch.distributed when an engine starts,
    # the deprecated alias `reduce_op` among them.
    ("`torch.distributed.reduce_op` is deprecated", FutureWarning),
    # megatron-core 0.16.1's dist_checkpointing (every checkpoint load: resume, the demo's SFT base) calls
    # torch's deprecated `load_state_dict` and passes ShardedTensor, which torch deprecates for DTensor.
    ("`load_state_dict` is deprecated and will be removed", FutureWarning),
    ("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    # torch 2.13 renames these two collectives (`*_single`); megatron-core 0.16.1 (sequence parallelism,
    # the DDP buffers) and our refit gather (rollout/weight_export.py) still call the old names.
    ("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning),
    ("`torch.distributed.reduce_scatter_tensor` is deprecated", FutureWarning),
):
    warnings.filterwarnings("ignore", message=_message, category=_category)
del _message, _category
