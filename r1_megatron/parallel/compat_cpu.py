"""The ONE place that makes megatron-core 0.16.1 run on CPU with gloo.

megatron-core assumes a CUDA device in a few dozen spots (docs/cpu_platform.md lists them). On a machine
without one, `activate()` installs every fix in FIXES; on a CUDA machine it does nothing, so the GPU path
runs megatron-core exactly as shipped. Every fix names its test (tests/unit/test_compat_cpu.py and
tests/unit/test_compat_cpu_parallel.py), which (a) asserts the upstream behaviour it works around is
still there, so a megatron upgrade that fixes it upstream makes a test fail and the patch can be
dropped, and (b) exercises the patched path.

Not patched here, because config flags or layer specs cover it (see r1_megatron/model/):
`use_cpu_initialization`, every `*_fusion=False`, `moe_grouped_gemm=False`, an SDPA core attention for
MLA (the local DotProductAttention rejects MLA's k/v channels), and an RMSNorm that accepts sequence
parallelism (the torch norm asserts it is off).

The fixes (FIXES holds each one's reason and test; listed in the order activate() installs them):
1. cuda_device_modules: the modules in CUDA_DEVICE_MODULES see a module-scoped `torch` (`_CpuTorch`)
   whose device requests resolve to the CPU; the real `torch` module is never modified.
2. rng_tracker: megatron's RNG tracker keeps CPU generator states instead of CUDA ones.
3. te_probe: MLA's `HAVE_TE` is False without transformer-engine; `moe_utils.te_general_gemm` is None.
4. alltoall_split_sizes: the alltoall dispatcher's split sizes become numpy arrays, as on GPU.
5. grad_norm: grad norm and clipping in plain torch ops (no apex/TE multi-tensor kernels).
6. shared_embedding: the embedding shared by the first and last pipeline stage is all-reduced on CPU.
7. expert_bias_uncompiled: the expert-bias add runs uncompiled (inductor spends seconds on it).
8. mla_down_proj: MLA's down-projections run at full width under TP > 1 with sequence parallelism.
9. float16_optimizer: the bf16 optimizer sees CUDA type names for CPU tensors while it is built.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import types
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

_ACTIVE = False
_MISSING = object()  # marks an attribute that did not exist before activate()
# "module.attr" -> the upstream object activate() replaced (or _MISSING).
REPLACED: dict[str, Any] = {}

# Upstream modules whose `torch.cuda.current_device()` / `device="cuda"` calls lie on paths we use.
# module -> why it is listed.
CUDA_DEVICE_MODULES: dict[str, str] = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding":
        "MLA builds RotaryEmbedding without use_cpu_initialization; get_emb moves inv_freq to cuda",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding":
        "YarnRotaryEmbedding.get_emb moves inv_freq_extra/inter to cuda on its first call",
    "megatron.core.transformer.moe.router":
        "TopKRouter allocates expert_bias/local_tokens_per_expert on cuda; gating() moves weights to cuda",
    "megatron.core.transformer.moe.token_dispatcher":
        "the alltoall dispatcher creates a torch.cuda.Stream and records/syncs cuda events",
    "megatron.core.transformer.moe.moe_utils":
        "track_moe_metrics(force_initialize=True) allocates the aux-loss tracker with device='cuda'",
    "megatron.core.transformer.multi_token_prediction":
        "MTPLossLoggingHelper allocates its loss tracker on cuda (every training forward with MTP)",
    "megatron.core.pipeline_parallel.schedules":
        "every forward_backward_* schedule creates total_num_tokens with device='cuda'",
    "megatron.core.pipeline_parallel.p2p_communication":
        "receive buffers between pipeline stages are allocated on cuda (PP > 1)",
    "megatron.core.tensor_parallel.mappings":
        "TP/SP all-gather and reduce-scatter allocate their outputs on cuda (TP > 1)",
    "megatron.core.tensor_parallel.layers":
        "the sequence-parallel linear allocates its all-gather buffer on cuda (TP > 1)",
    "megatron.core.utils":
        "GlobalMemoryBuffer (the sequence-parallel all-gather buffers) allocates on cuda (TP > 1)",
    "megatron.core.dist_checkpointing.strategies.filesystem_async":
        "the torch_dist save preloads tensors to host and then calls torch.cuda.synchronize()",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver":
        "the save's global success check all-reduces a flag allocated on cuda",
    "megatron.core.distributed.param_and_grad_buffer":
        "DDP allocates its contiguous grad (and param) buffers on torch.cuda.current_device()",
    "megatron.core.optimizer.optimizer":
        "FP32Optimizer keeps its loss scale in a torch.tensor(..., device='cuda')",
}


class _CpuCuda:
    """Stand-in for `torch.cuda` inside the listed modules: device queries answer 'cpu', streams are
    no-ops (CPU work is synchronous), anything else falls through to the real `torch.cuda`."""

    class Stream:
        """A stream that does nothing: CPU ops complete in program order."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def wait_stream(self, other: Any) -> None:
            pass

        def synchronize(self) -> None:
            pass

        def record_event(self) -> _CpuCuda.Stream:
            return self  # an "event" whose synchronize() returns at once

    _current_stream = Stream()

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @classmethod
    def current_stream(cls, *args: Any) -> Stream:
        return cls._current_stream

    @staticmethod
    def stream(s: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(*args: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _cpu_device(device: Any) -> Any:
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _cpu_factory(fn: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    factory.__name__ = fn.__name__
    return factory


class _CpuTorch(types.ModuleType):
    """Module-scoped `torch` for the modules in CUDA_DEVICE_MODULES: tensor factories map
    device='cuda' to the CPU and `torch.cuda` is `_CpuCuda`; everything else is the real torch."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like")

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in self._FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))
        self.device = _cpu_torch_device

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class _DeviceMeta(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, torch.device)


class _cpu_torch_device(metaclass=_DeviceMeta):  # noqa: N801 - stands in for torch.device
    """`torch.device("cuda")` -> cpu; isinstance checks against it still see torch.device."""

    def __new__(cls, *args: Any) -> torch.device:
        dev = torch.device(*args)
        return torch.device("cpu") if dev.type == "cuda" else dev


# RNG: megatron's tracker forks CUDA generator states; on CPU it forks the CPU generator.
def _get_cpu_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _make_cpu_tracker_class(base: type) -> type:
    class CpuRNGStatesTracker(base):
        """megatron's CudaRNGStatesTracker with CPU generator states (same names, same seeds)."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


# Grad norm / clipping without apex or TE multi-tensor kernels.
def _get_grad_norm_fp32(
    grads_for_norm, norm_type=2, grad_stats_parallel_group=None, data_parallel_group=None
):
    """Same contract as megatron.core.optimizer.clip_grads.get_grad_norm_fp32, in plain torch."""
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(grads_for_norm, torch.Tensor):
        grads_for_norm = [grads_for_norm]
    grads = [to_local_if_dtensor(g).float() for g in grads_for_norm]
    norm_type = float(norm_type)
    if norm_type == math.inf:
        total = torch.tensor([max((g.abs().max().item() for g in grads), default=0.0)])
        op = torch.distributed.ReduceOp.MAX
    else:
        total = torch.zeros(1)
        for g in grads:
            total += torch.linalg.vector_norm(g, norm_type) ** norm_type
        op = torch.distributed.ReduceOp.SUM
    if data_parallel_group:
        torch.distributed.all_reduce(total, op=op, group=data_parallel_group)
    torch.distributed.all_reduce(total, op=op, group=grad_stats_parallel_group)
    value = total.item()
    return value if norm_type == math.inf else value ** (1.0 / norm_type)


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Same contract as megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32."""
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for p in parameters:
            g = getattr(p, attr, None)
            if g is not None:
                to_local_if_dtensor(g).mul_(clip_coeff)


# Alltoall dispatcher: split sizes reach all_to_all_single as numpy arrays, as they do on GPU.
def _maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """Upstream converts to numpy only for CUDA tensors; CPU split sizes stay tensors and
    all_to_all_single raises a TypeError. Convert them too."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.cpu().numpy()
    return tensor


# Shared embedding across pipeline stages (PP > 1 with MTP or tied embeddings).
class _NoDistTorch(types.ModuleType):
    """`torch` as seen by language_module while its setup runs: distributed looks uninitialized."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.distributed = types.SimpleNamespace(is_initialized=lambda: False)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _make_setup_embeddings(original: Any) -> Any:
    def setup_embeddings_and_output_layer(self) -> None:
        """Upstream moves the stage-shared embedding with `.cuda()` before all-reducing it between the
        first and last pipeline stage. Run upstream with that branch skipped, then all-reduce on CPU."""
        import megatron.core.models.common.language_module.language_module as lm

        saved_torch, saved_flag = lm.torch, getattr(lm.LanguageModule, "embedding_warning_printed", False)
        lm.torch, lm.LanguageModule.embedding_warning_printed = _NoDistTorch(), True
        try:
            original(self)
        finally:
            lm.torch, lm.LanguageModule.embedding_warning_printed = saved_torch, saved_flag
        if torch.distributed.is_initialized() and self._is_in_embd_group():
            weight = self.shared_embedding_or_output_weight()
            torch.distributed.all_reduce(weight.data, group=self.embd_group)

    return setup_embeddings_and_output_layer


def _down_proj_forward(
    self: Any, input_: torch.Tensor, weight: Any = None, runtime_gather_output: Any = None
) -> tuple[torch.Tensor, None]:
    """A column-parallel MLA down-projection run as a full (duplicated) linear on this rank's
    sequence shard: y_r = x_r @ all_gather(W)^T, returned at full width.

    Why: in the local spec the down-projections are ColumnParallelLinear; MLA then all-gathers the
    output columns, and the backward of that gather keeps only this rank's column slice of the
    gradient. The shared rope key k_pe is used by every rank's heads, so its gradient differs per
    rank and the other ranks' share is lost (loss right, kv_down_proj rope rows' grads wrong).
    At full width MLA takes its duplicated-linear path (as with transformer-engine's TELinear):
    k_pe is gathered over the sequence and its gradient reduce-scattered, i.e. summed. The weight
    keeps its sharded storage (and checkpoint layout); the all-gather's backward reduce-scatters the
    per-shard weight gradients, which sums the sequence shards' contributions."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    full = gather_from_sequence_parallel_region(
        self.weight, tensor_parallel_output_grad=True, group=self.tp_group
    )
    return torch.nn.functional.linear(input_, full), None


def _mla_init_with_full_width_down_proj(original: Any) -> Any:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear

        if not (self.config.sequence_parallel and self.tp_group is not None and self.tp_group.size() > 1):
            return
        for name in ("linear_q_down_proj", "linear_kv_down_proj"):
            layer = getattr(self, name, None)
            if type(layer) is ColumnParallelLinear:
                layer.forward = types.MethodType(_down_proj_forward, layer)

    __init__.__wrapped__ = original
    return __init__


# Float16OptimizerWithFloat16Params (bf16 weights, fp32 main copies) sorts its params by
# `param.type()` against the CUDA type names only ("torch.cuda.BFloat16Tensor", ...) and raises a
# TypeError for CPU tensors. While it is constructed, CPU tensors report the CUDA names.
_CUDA_TYPE_NAMES = {
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.FloatTensor": "torch.cuda.FloatTensor",
}


def _float16_optimizer_init_on_cpu(original: Any) -> Any:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        real_type = torch.Tensor.type

        def cuda_named_type(t: torch.Tensor, *a: Any, **k: Any) -> Any:
            name = real_type(t, *a, **k)
            return _CUDA_TYPE_NAMES.get(name, name) if not (a or k) else name

        torch.Tensor.type = cuda_named_type
        try:
            original(self, *args, **kwargs)
        finally:
            torch.Tensor.type = real_type

    __init__.__wrapped__ = original
    return __init__


def cuda_in_use() -> bool:
    """True when this process runs megatron-core on a CUDA device (then nothing is patched)."""
    return torch.cuda.is_available()


def is_active() -> bool:
    return _ACTIVE


def _replace(owner: Any, attr: str, value: Any) -> None:
    """Set owner.attr = value, remembering what was there (REPLACED) so tests can check upstream."""
    key = f"{getattr(owner, '__name__', owner)}.{attr}"
    REPLACED.setdefault(key, getattr(owner, attr, _MISSING))
    setattr(owner, attr, value)


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _fix_cuda_device_modules() -> None:
    cpu_torch = _CpuTorch()
    for name in CUDA_DEVICE_MODULES:
        _replace(importlib.import_module(name), "torch", cpu_torch)


def _fix_rng_tracker() -> None:
    import megatron.core.tensor_parallel.random as tp_random

    _replace(tp_random, "_get_cuda_rng_state", _get_cpu_rng_state)
    _replace(tp_random, "_set_cuda_rng_state", _set_cpu_rng_state)
    _replace(tp_random, "CudaRNGStatesTracker", _make_cpu_tracker_class(tp_random.CudaRNGStatesTracker))
    # Drop a tracker built before activation, so the next get_cuda_rng_tracker() makes a CPU one.
    tp_random.initialize_rng_tracker(force_reset=True)


def _fix_te_probe() -> None:
    import megatron.core.transformer.multi_latent_attention as mla

    if not _have_te():
        # extensions.transformer_engine imports without TE (its classes are MagicMocks), so MLA sets
        # HAVE_TE = True and then isinstance(linear_proj, TELinear) raises a TypeError.
        _replace(mla, "HAVE_TE", False)

    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        # The failed TE import leaves the name undefined; RouterGatingLinearFunction tests it for None.
        _replace(moe_utils, "te_general_gemm", None)


def _fix_alltoall_split_sizes() -> None:
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    _replace(token_dispatcher, "maybe_move_tensor_to_cpu", _maybe_move_tensor_to_cpu)


def _fix_grad_norm() -> None:
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as optimizer

    for module in (clip_grads, optimizer):
        _replace(module, "get_grad_norm_fp32", _get_grad_norm_fp32)
        _replace(module, "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_fp32)


def _fix_shared_embedding() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    _replace(
        LanguageModule,
        "setup_embeddings_and_output_layer",
        _make_setup_embeddings(LanguageModule.setup_embeddings_and_output_layer),
    )


def _fix_expert_bias_uncompiled() -> None:
    from megatron.core.transformer.moe.router import TopKRouter

    compiled = TopKRouter.__dict__["_apply_expert_bias"]
    _replace(TopKRouter, "_apply_expert_bias", getattr(compiled, "_torchdynamo_orig_callable", compiled))


def _fix_mla_down_proj() -> None:
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    _replace(MLASelfAttention, "__init__", _mla_init_with_full_width_down_proj(MLASelfAttention.__init__))


def _fix_float16_optimizer() -> None:
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params as F16

    _replace(F16, "__init__", _float16_optimizer_init_on_cpu(F16.__init__))


class Fix(NamedTuple):
    """One CPU fix: its name, why upstream needs it on CPU, the test that pins it, and its installer."""

    name: str
    why: str
    test: str
    install: Callable[[], None]


_T = "tests/unit/test_compat_cpu.py::"
_TP = "tests/unit/test_compat_cpu_parallel.py::"
# The one table of fixes, in install order (the module docstring describes each).
FIXES: list[Fix] = [
    Fix("cuda_device_modules", "listed modules ask for torch.cuda devices, streams and buffers",
        _T + "test_listed_modules_still_ask_for_cuda_and_see_the_cpu_proxy", _fix_cuda_device_modules),
    Fix("rng_tracker", "the tracker forks CUDA generator states",
        _T + "test_rng_tracker_forks_cpu_states", _fix_rng_tracker),
    Fix("te_probe", "MLA sees HAVE_TE with MagicMock TE classes; te_general_gemm is undefined",
        _T + "test_mla_te_probe_and_router_gemm", _fix_te_probe),
    Fix("alltoall_split_sizes", "CPU split sizes reach all_to_all_single as tensors",
        _T + "test_alltoall_split_sizes_become_numpy", _fix_alltoall_split_sizes),
    Fix("grad_norm", "grad norm and clipping use apex/TE kernels and cuda buffers",
        _T + "test_grad_norm_and_clip_without_cuda", _fix_grad_norm),
    Fix("shared_embedding", "the stage-shared embedding moves with .cuda() before its all-reduce",
        _T + "test_two_ranks_tp_sp_ep_and_pp_match_single_rank", _fix_shared_embedding),
    Fix("expert_bias_uncompiled", "inductor compiles a two-line add for seconds per process",
        _T + "test_single_rank_training_step_through_megatron_schedule", _fix_expert_bias_uncompiled),
    Fix("mla_down_proj", "TP>1 with sequence parallelism drops the other ranks' rope-key grads",
        _TP + "test_mla_down_projections_upstream_path_still_drops_rope_key_grads", _fix_mla_down_proj),
    Fix("float16_optimizer", "the bf16 optimizer sorts params by CUDA tensor type names only",
        "tests/unit/test_precision.py::test_upstream_float16_optimizer_rejects_cpu_tensors",
        _fix_float16_optimizer),
]


def activate() -> bool:
    """Install every fix in FIXES once. A no-op when CUDA is available. Returns whether they are active."""
    global _ACTIVE
    if _ACTIVE:
        return True
    if cuda_in_use():
        return False
    for fix in FIXES:
        fix.install()
    _ACTIVE = True
    return True
