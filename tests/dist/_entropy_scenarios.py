"""Worker side of tests/dist/test_entropy_layouts.py: `python tests/dist/_entropy_scenarios.py MODE OUT [ARGS...]`.

One GRPO step (rl.entropy_coef > 0, MTP off as in rl/loop.py) on micro_moe over the same rollout batch:
  reference OUT          world 1: initial checkpoint; the step, with the entropy the loss gets and a
                         full-softmax reference from the output layer's logits (a hook of the test's own)
  layouts OUT INIT L...  for each layout L ("tp,pp,ep,etp,dp,dispatcher"): load INIT, the same step
Per-token entropies are written by the last pipeline stage's first TP rank when dp == 1.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import gc
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist._scenarios import build, job_config, save_rank0, start  # noqa: E402
from tests.unit.test_shared_prompts import _batch  # noqa: E402

CAPACITY = 32
ENTROPY_COEF = 0.1


def grpo_step(trainer, record_logits: bool = False) -> dict:
    """The step; returns its finalized metrics and, on the last stage, the per-token entropies the loss
    got (cut to the unpadded length) and, with record_logits, the full-softmax entropies."""
    from megatron.core import parallel_state as ps

    from r1_megatron.model.provider import mtp_disabled
    from r1_megatron.rl.batching import microbatches
    from r1_megatron.rl.loss import grpo_loss
    from r1_megatron.rl.losses import entropy_from_logits, finalize_metrics

    batch = _batch(groups=3, g=4, seed=11)
    rl = dataclasses.replace(trainer.cfg.rl, kl_coef=0.0, entropy_coef=ENTROPY_COEF)
    mbs = microbatches(batch, CAPACITY)
    loss = grpo_loss(rl, batch.loss_norm(16))
    seen, full = [], []

    def loss_fn(logprobs, mb, entropy=None):
        seen.append(entropy.detach()[:, : mbs[len(seen)].shape[1]].clone())
        return loss(logprobs, mb, entropy=entropy)

    def hook(module, args, output):  # before megatron's cross entropy rewrites the logits in place
        logits = output[0].detach().transpose(0, 1).double()
        full.append(entropy_from_logits(logits)[:, : mbs[len(full)].shape[1]])

    handle = trainer.unwrapped.output_layer.register_forward_hook(hook) if record_logits else None
    with mtp_disabled(trainer.unwrapped):
        metrics = finalize_metrics(trainer.train_step(mbs, loss_fn, entropy=True))
    if handle is not None:
        handle.remove()
    writer = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    return {"metrics": metrics, "entropy": seen if writer else None, "full_softmax": full or None}


def reference(out: Path) -> None:
    from r1_megatron.train import checkpointing as ckpt
    from r1_megatron.train.trainer import Trainer

    cfg = job_config()
    layout, device = start(cfg)
    trainer = Trainer(cfg, layout, device)
    init = ckpt.save(trainer, out / "init")
    result = grpo_step(trainer, record_logits=True)
    torch.save({**result, "init": str(init)}, out / "reference.pt")


def layouts(out: Path, init: str, specs: list[str]) -> None:
    import torch.distributed as dist

    from r1_megatron.train import checkpointing as ckpt

    results = {}
    for i, spec in enumerate(specs):
        tp, pp, ep, etp, dp, dispatcher = spec.split(",")
        cfg = job_config(tp=int(tp), pp=int(pp), ep=int(ep), etp=int(etp), dp=int(dp), dispatcher=dispatcher)
        if i == 0:
            start(cfg)
        trainer = build(cfg, dist.get_world_size())
        ckpt.load(trainer, init, with_optimizer=False)
        result = grpo_step(trainer)
        # The per-token entropies live on one rank: bring them to rank 0, which writes the results.
        box = [result["entropy"]]
        writer = torch.tensor([dist.get_rank() if result["entropy"] is not None else 0])
        dist.all_reduce(writer)
        dist.broadcast_object_list(box, src=int(writer))
        results[spec] = {"metrics": result["metrics"], "entropy": box[0] if int(dp) == 1 else None}
        del trainer
        gc.collect()
    save_rank0(results, out / "layouts.pt")


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    mode, out_path, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    out_path.mkdir(parents=True, exist_ok=True)
    if mode == "reference":
        reference(out_path)
    else:
        layouts(out_path, rest[0], rest[1:])
