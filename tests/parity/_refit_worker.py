"""Trainer side of tests/parity/test_refit_layouts.py: `python tests/parity/_refit_worker.py OUT LAYOUT...`.

Runs under tests/dist/_launch.py (torchrun-like env). For each LAYOUT "tag:tp,pp,ep[,first_stage_layers]"
it builds the tiny_moe trainer from seed SEEDS[tag] and writes, through the production functions:
  OUT/<tag>_stream.pt  the refit stream (rl/session.py `weight_stream`: every rank gathers and receives
                       the full tensors, which its colocated vLLM rank cuts into its shard), rank 0's, as a
                       list of (HF name, tensor) pairs. In a GRPO run it goes into the colocated engines in
                       process (tests/dist/test_grpo_layouts.py); here the file carries it to an engine
                       in the pytest process, to compare against a fresh engine there.
  OUT/<tag>_hf/        the HF export of the same weights (train/weights.py `export_hf`, which builds the
                       engine's initial checkpoint in a GRPO run).
"""

from __future__ import annotations

import faulthandler
import gc
import signal
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from r1_megatron.config.loader import load_config  # noqa: E402

BUCKET_MB = 1  # several buckets per stream (the model is ~6 MB in fp32)
SEEDS = {"tp2": 11, "pp2_ep2": 12}  # distinct weights per layout, and not the engine's initial ones


def job_config(tag: str, spec: str):
    tp, pp, ep, *first = (int(x) for x in spec.split(","))
    overrides = [
        "model.card=tiny_moe", "parallel.backend=gloo", "parallel.device=cpu",
        f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.ep={ep}", f"parallel.sequence_parallel={tp > 1}",
        f"seed={SEEDS[tag]}",
    ]
    if first:  # tiny_moe has 3 layers: an uneven pipeline split
        overrides += [f"parallel.first_stage_layers={first[0]}", f"parallel.last_stage_layers={3 - first[0]}"]
    return load_config(None, overrides)


def distinct_norms_and_biases(model: torch.nn.Module) -> None:
    """A fresh init has every norm at 1 and the routers' bias at 0, so a refit that swapped two of them
    would go unseen: give each its own values. The noise is seeded by the tensor's name, so the
    replicas of a tensor on different ranks stay equal."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and ("norm" in name or "expert_bias" in name):
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                t.add_(0.1 * torch.randn(t.shape, generator=g).to(t.device))


def export(out: Path, tag: str, spec: str) -> None:
    import torch.distributed as dist

    from r1_megatron.parallel.device import seed_all
    from r1_megatron.parallel.groups import init_process_groups, resolve_layout, set_layout
    from r1_megatron.rl.session import weight_stream
    from r1_megatron.train.weights import export_hf
    from r1_megatron.train.trainer import Trainer

    cfg = job_config(tag, spec)
    if dist.is_initialized():
        layout = resolve_layout(cfg, dist.get_world_size())
        set_layout(layout)
        seed_all(cfg.seed)
    else:
        layout, _ = init_process_groups(cfg)
    trainer = Trainer(cfg, layout, torch.device("cpu"))
    distinct_norms_and_biases(trainer.unwrapped)
    pairs = list(weight_stream(trainer, BUCKET_MB))  # views into the buckets, as vLLM would get them
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, [n for n, _ in pairs])
    assert all(n == names[0] for n in names), "every rank receives the same stream"
    if dist.get_rank() == 0:
        torch.save(pairs, out / f"{tag}_stream.pt")
    export_hf(trainer, out / f"{tag}_hf", tokenizer_dir=None)
    dist.barrier()
    del trainer, pairs
    gc.collect()


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    out_dir, *layouts = sys.argv[1:]
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    for item in layouts:
        export(out_path, *item.split(":"))
