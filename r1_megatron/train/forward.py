"""The forward-only model: one rank's model chunk without DDP grad buffers, optimizer or schedule.

One holder serves the GRPO reference (the frozen policy at the start of RL, kept on the host between
its forwards when offload.reference_on_host), `r1m score` and `r1m convert` at a (tp, pp, ep) split.
It runs the trainer's own forward_logprobs path, in the training dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from r1_megatron.checkpoint.mcore_io import read_card
from r1_megatron.config.schema import JobConfig, ModelConfig, ParallelConfig
from r1_megatron.offload import Offloader, model_tensors
from r1_megatron.train import checkpointing
from r1_megatron.train.microbatch import Microbatch
from r1_megatron.train.trainer import Trainer
from r1_megatron.train.weights import load_initial_weights


class ForwardModel:
    """`trainer` is a forward-only Trainer (its `model`, `unwrapped`, `forward_logprobs`).

    load: the weights to start from (default cfg.checkpoint.load; "" keeps the init). on_host: keep
    the storages on the host except inside `logprobs` (default cfg.offload.reference_on_host)."""

    def __init__(self, cfg: JobConfig, layout: ParallelConfig, device: torch.device, *,
                 load: str | None = None, on_host: bool | None = None):
        self.trainer = Trainer(cfg, layout, device, for_training=False)
        load_initial_weights(self.trainer, cfg.checkpoint.load if load is None else load)
        self._offload = Offloader(model_tensors(self.trainer.model[0]), pin_memory=cfg.offload.pin_memory)
        if cfg.offload.reference_on_host if on_host is None else on_host:
            self._offload.offload()

    @classmethod
    def open(cls, ckpt_dir: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1,
             verify: str = "full") -> ForwardModel:
        """Start this process's groups (torchrun environment) at (tp, pp, ep) and build its model chunk,
        loaded from a megatron checkpoint of any layout (weights only). Collective over all ranks."""
        from r1_megatron.parallel.groups import init_process_groups

        cfg = inference_config(read_card(ckpt_dir), tp=tp, pp=pp, ep=ep)
        layout, device = init_process_groups(cfg)
        held = cls(cfg, layout, device, load="", on_host=False)
        checkpointing.load(held.trainer, ckpt_dir, with_optimizer=False, verify=verify)
        return held

    def logprobs(self, mbs: list[Microbatch]) -> list[torch.Tensor]:
        if self._offload.offloaded:
            self._offload.reload()
            try:
                return self.trainer.forward_logprobs(mbs)
            finally:
                self._offload.offload()
        return self.trainer.forward_logprobs(mbs)


def inference_config(card: ModelConfig, *, tp: int = 1, pp: int = 1, ep: int = 1) -> JobConfig:
    """A job config that runs `card` at (tp, pp, ep) for forward use (scoring, conversion)."""
    parallel = ParallelConfig(
        tp=tp, pp=pp, ep=ep, etp=tp if ep == 1 else 1, sequence_parallel=tp > 1, dispatcher="alltoall"
    )
    return JobConfig(model=card, parallel=parallel)
