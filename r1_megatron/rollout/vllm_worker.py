"""The engine's worker-side pieces: what a refit runs inside vLLM's worker (through collective_rpc)
and what the engine reads from a model directory. Kept apart from vllm_engine.py, which drives them.

vLLM-CPU packs MoE expert weights into its own layout at load; a full `reload_weights` leaves the
experts unpacked (silently wrong output), so `repack_cpu_moe` redoes the pack after it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from r1_megatron.rollout import speculative
from r1_megatron.rollout.vllm_cpu_refit import CpuFastRefit, build_fast_refit


def checkpoint_weight_names(model_dir: str | Path) -> set[str]:
    """The tensor names stored in an HF safetensors checkpoint directory (headers only, no data)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            names.update(handle.keys())
    return names


def eos_ids(model_dir: Path) -> list[int]:
    """EOS ids from generation_config.json, else config.json ([] when neither names one)."""
    for fname in ("generation_config.json", "config.json"):
        path = model_dir / fname
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return []


def repack_cpu_moe(model: torch.nn.Module) -> int:
    """Re-pack every CPU fused-MoE layer's w13/w2 after an in-place reload; returns the layer count.

    vLLM's unquantized MoE method calls `fused_experts.process_weights_after_loading` (the CPU
    pre-pack) only on the first load (`_setup_kernel` skips it when `moe_kernel` exists). The pack
    keeps the shape, so it is copied back into the same storage the kernel reads.
    """
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
        CPUUnquantizedExperts,
        cpu_prepack_moe_weight,
    )

    count = 0
    for name, module in model.named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if not isinstance(experts, CPUUnquantizedExperts) or experts._use_zentorch:
            continue
        size = experts.moe_config.intermediate_size_per_partition
        if experts._padded_intermediate_size(experts.moe_config) != size:
            raise RuntimeError(
                f"{name}: CPU MoE refit needs moe_intermediate_size ({size}) to be a multiple of "
                f"{experts._intermediate_alignment()} (vLLM pads it on load and cannot reload a padded layer)"
            )
        for pname in ("w13_weight", "w2_weight"):
            param = getattr(module, pname)
            param.data.copy_(cpu_prepack_moe_weight(param.data, experts.isa))
        count += 1
    return count


def reload_on_worker(worker: Any, weights: Iterable[tuple[str, torch.Tensor]], repack: bool) -> int:
    """Runs inside the vLLM worker (collective_rpc): in-place reload (of the MTP drafter too, see
    `speculative.reload_drafter`), then the CPU MoE re-pack."""
    runner = worker.model_runner
    weights, kept = speculative.tee_drafter_weights(runner, weights)
    worker.reload_weights(weights_iterator=weights)
    models = [runner.get_model(), *speculative.reload_drafter(runner, kept)]
    return sum(repack_cpu_moe(m) for m in models) if repack else 0


def fast_refit_on_worker(worker: Any, model_dir: Path, names: set[str]) -> CpuFastRefit | None:
    """Runs inside the vLLM worker (collective_rpc): the fast refit of its model (and of its MTP
    drafter when speculating), or None."""
    runner = worker.model_runner
    return build_fast_refit(runner.get_model(), model_dir, names, runner.model_config.dtype,
                            drafter=speculative.drafter_model(runner))
