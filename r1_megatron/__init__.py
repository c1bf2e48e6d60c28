"""r1-megatron: DeepSeek-R1 GRPO on megatron-core."""

import warnings

# Every import of megatron-core and vLLM by this package passes through here first. Without
# transformer-engine and apex (always so on CPU; docs/cpu_platform.md) megatron-core 0.16.1 warns at
# import, from five modules, that it falls back to torch implementations; the fallbacks are what the
# CPU path is built on (parallel/compat_cpu.py), and `r1m doctor` reports what is installed. Its own
# default `cuda_graph_scope="full"` warns at every model build. Only these exact messages are silenced.
for _message in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed. Falling back to Torch Norm",
    "full scope is deprecated",
    # Under sequence parallelism, megatron's expert linears at expert-TP 1 turn it off for themselves
    # (what MoE with parallel.etp=1 wants) and say so, once per layer and rank.
    "`sequence_parallel` is set to `True`, but tensor model parallel size is 1",
):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
del _message
# vLLM 0.32's kernel dispatcher reads every attribute of torch.distributed when an engine starts,
# the deprecated alias `reduce_op` among them.
# megatron-core 0.16.1's dist_checkpointing (every checkpoint load: resume, the demo's SFT base) calls
# torch's deprecated `load_state_dict` and passes ShardedTensor, which torch deprecates for DTensor.
for _message in (
    "`torch.distributed.reduce_op` is deprecated",
    "`load_state_dict` is deprecated and will be removed",
    "Please use DTensor instead and we are deprecating ShardedTensor",
    # torch 2.13 renames these two collectives (`*_single`); megatron-core 0.16.1 (sequence parallelism,
    # the DDP buffers) and our refit gather (rollout/weight_export.py) still call the old names.
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
):
    warnings.filterwarnings("ignore", message=_message, category=FutureWarning)
del _message
