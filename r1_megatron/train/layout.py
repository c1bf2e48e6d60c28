"""The trainer's layout-dependent TransformerConfig fields: uneven pipeline stages and activation
recompute (checked against megatron-core's module list), and layout switching for tests and tools."""

from __future__ import annotations

import dataclasses

from r1_megatron.config.loader import ConfigError
from r1_megatron.config.schema import JobConfig, ParallelConfig


# megatron-core 0.16.1's selective-recompute modules; the GPU-only ones need grouped GEMM (moe_act)
# or transformer-engine's layer norm (layernorm).
RECOMPUTE_MODULES = ("core_attn", "mla_up_proj", "mlp", "moe", "shared_experts", "moe_act", "layernorm")
GPU_ONLY_RECOMPUTE = ("moe_act", "layernorm")


def _check_recompute(layout: ParallelConfig, gpu: bool) -> None:
    mods = layout.recompute_modules
    if mods and layout.recompute != "selective":
        raise ConfigError(f"parallel.recompute_modules {mods} needs parallel.recompute=selective, "
                          f"got {layout.recompute!r}")
    for name in mods:
        if name not in RECOMPUTE_MODULES:
            raise ConfigError(f"parallel.recompute_modules: {name!r} is not one of {list(RECOMPUTE_MODULES)}")
        if name in GPU_ONLY_RECOMPUTE and not gpu:
            raise ConfigError(f"parallel.recompute_modules: {name!r} needs the GPU path "
                              "(grouped GEMM / transformer-engine)")


def stage_overrides(cfg: JobConfig, layout: ParallelConfig, gpu: bool = False) -> dict:
    """TransformerConfig fields for uneven pipeline stages and activation recompute."""
    _check_recompute(layout, gpu)
    out: dict = {}
    if layout.pp > 1:
        if layout.first_stage_layers is not None:
            out["num_layers_in_first_pipeline_stage"] = layout.first_stage_layers
        if layout.last_stage_layers is not None:
            out["num_layers_in_last_pipeline_stage"] = layout.last_stage_layers
    if layout.recompute == "full":
        out.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif layout.recompute == "selective":
        # megatron's own default module list (["core_attn"]) when none is given
        out.update(recompute_granularity="selective", recompute_modules=list(layout.recompute_modules) or None)
    return out


def replace_layout(cfg: JobConfig, **changes) -> JobConfig:
    """A copy of `cfg` with `parallel` fields changed (tests and tools that switch layouts)."""
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **changes))
