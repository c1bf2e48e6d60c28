"""The step's metric sums: the loss_fn metrics summed over microbatches and DP ranks, and megatron's
MTP / MoE aux-loss trackers read out as means, the same on every rank of the pipeline."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from r1_megatron.config.schema import JobConfig


def reduce_sums(outputs: list[dict[str, torch.Tensor]], pp: int, device: torch.device) -> dict[str, float]:
    """Sum the loss_fn metrics over microbatches, then over DP; share them from the last stage."""
    last = parallel_state.is_pipeline_last_stage()
    keys = sorted(outputs[0]) if last and outputs else []
    if pp > 1:
        box = [keys]
        dist.broadcast_object_list(
            box,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        keys = box[0]
    vec = torch.zeros(len(keys), dtype=torch.float64, device=device)
    if last:
        for out in outputs:
            vec += torch.stack([out[k].double().reshape(()) for k in keys]).to(device)
        dist.all_reduce(vec, group=parallel_state.get_data_parallel_group())
    if pp > 1:
        dist.broadcast(
            vec,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return dict(zip(keys, vec.tolist(), strict=True))


def aux_metrics(cfg: JobConfig, num_microbatches: int, pp: int, device: torch.device) -> dict[str, float]:
    """Raw MTP cross entropy (mean over MTP layers) and MoE seq aux loss (summed over layers,
    coefficient not applied) of this step, as means over microbatches and DP ranks. Their
    shares of the objective are mtp_loss_scale * mtp_loss and seq_aux_loss_coeff * moe_aux_loss."""
    values = torch.zeros(2, dtype=torch.float64, device=device)
    mtp = MTPLossLoggingHelper.tracker.get("values")
    if mtp is not None and parallel_state.is_pipeline_last_stage():
        values[0] = mtp.double().mean()
    for entry in get_moe_layer_wise_logging_tracker().values():
        part = entry["values"].double().sum().reshape(1)
        # The seq aux loss is computed on each TP rank's sequence shard: partial sums.
        if entry.get("reduce_group") is not None:
            dist.all_reduce(part, group=entry["reduce_group"])
        values[1] += part[0]
    values /= num_microbatches
    dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
    values /= parallel_state.get_data_parallel_world_size()
    if pp > 1:
        dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    clear_loss_trackers()
    out = {}
    if cfg.model.mtp_num_layers:
        out["mtp_loss"] = float(values[0])
    if cfg.model.num_experts and cfg.model.seq_aux_loss_coeff > 0:
        out["moe_aux_loss"] = float(values[1])
    return out


def clear_loss_trackers() -> None:
    """Empty megatron's MTP / MoE aux-loss logging trackers (module globals that forwards fill).

    Emptied rather than zeroed: an entry remembers the process group of the layout that made it."""
    MTPLossLoggingHelper.tracker.clear()
    get_moe_layer_wise_logging_tracker().clear()
