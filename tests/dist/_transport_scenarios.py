"""Worker side of tests/dist/test_refit_transport.py: `python _transport_scenarios.py MODE OUT [LAYOUT...]`.
On the CPU over gloo, or with TRANSPORT_DEVICE=cuda on one GPU per rank over NCCL.

  single OUT          world 1: micro_moe with distinct norms and router biases, saved under OUT/init, and
                      its refit stream (OUT/single.pt: the checkpoint path and (HF name, tensor) pairs)
  layouts OUT L...    for each layout L "tp,pp,ep,etp,dp": load the checkpoint, stream with dst=None (every
                      rank receives) and dst=0, counting the bytes each collective delivers to this
                      rank; writes OUT/rank<r>.pt with, per layout, the streams compared against
                      single.pt, the byte counts and the scratch buffers after each of the two streams
"""

from __future__ import annotations

import faulthandler
import gc
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.dist._scenarios import build, job_config, start  # noqa: E402
from tests.parity._refit_worker import distinct_norms_and_biases  # noqa: E402

BUCKET_BYTES = 64 * 1024  # many buckets, several per layer
# TRANSPORT_DEVICE=cuda: one GPU per rank over NCCL (model.dtype auto: bf16 there); else the CPU over gloo
DEVICE = {"device": "cuda", "backend": "nccl"} if os.environ.get("TRANSPORT_DEVICE") == "cuda" else {}


class Received:
    """Counts the bytes each collective delivers to this rank (algorithm-independent: what the rank
    lacked), by wrapping the torch.distributed calls the exporter may make."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls: dict[str, int] = {}
        self._saved: dict = {}

    def _count(self, name: str, nbytes: int) -> None:
        self.bytes += nbytes
        self.calls[name] = self.calls.get(name, 0) + 1

    def __enter__(self) -> Received:
        rank = dist.get_rank()
        wrappers = {
            "all_gather_into_tensor": lambda out, inp, *a, **k: out.nbytes - inp.nbytes,
            "broadcast": lambda t, src, *a, **k: 0 if src == rank else t.nbytes,
            "recv": lambda t, *a, **k: t.nbytes,
            "send": lambda t, *a, **k: 0,
            "all_reduce": lambda t, *a, group=None, **k: 2 * t.nbytes,  # ring: 2 (k-1)/k, bounded
            "reduce": lambda t, *a, **k: t.nbytes,
        }
        for name, size in wrappers.items():
            real = self._saved[name] = getattr(dist, name)

            def wrapped(*args, _real=real, _name=name, _size=size, **kwargs):
                self._count(_name, _size(*args, **kwargs))
                return _real(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._saved.items():
            setattr(dist, name, real)


def stream(trainer, dst: int | None) -> tuple[list[tuple[str, torch.Tensor]], Received, int]:
    """The stream (cloned), the bytes it delivered to this rank, and the bytes of the distinct weights
    in it (the MTP layer's copies of the embedding and head are the same tensors: counted once)."""
    from r1_megatron.rollout.weight_export import export_weights

    pairs, distinct = [], {}
    with Received() as counter:
        for k, v in export_weights(trainer.unwrapped, trainer.cfg.model, BUCKET_BYTES, dst=dst):
            distinct[(v.data_ptr(), v.nbytes)] = v  # kept alive: no later bucket reuses the address
            pairs.append((k, v.to("cpu", copy=True)))
    return pairs, counter, sum(v.nbytes for v in distinct.values())


def scratch(trainer) -> dict[str, torch.Tensor]:
    """The exporter's scratch buffers for this model, by tag (held here: a buffer made anew later
    cannot land at a held one's address)."""
    from r1_megatron.rollout.weight_export import _SCRATCH

    held = _SCRATCH.get(trainer.unwrapped)
    return dict(held._buffers) if held else {}


def addresses(buffers: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    return {tag: (b.data_ptr(), b.numel()) for tag, b in buffers.items()}


def single(out: Path) -> None:
    from r1_megatron.train import checkpointing as ckpt

    cfg = job_config(**DEVICE)
    start(cfg)
    trainer = build(cfg, 1)
    distinct_norms_and_biases(trainer.unwrapped)
    init = ckpt.save(trainer, out / "init")
    pairs, _, _ = stream(trainer, None)
    torch.save({"init": str(init), "pairs": pairs}, out / "single.pt")


def compare(got: list, want: list) -> list[str]:
    """Names of the differences (order, names, dtypes, shapes, bits); empty when bit-exact."""
    if [k for k, _ in got] != [k for k, _ in want]:
        return ["names or order differ"]
    return [k for (k, a), (_, b) in zip(got, want, strict=True)
            if a.dtype != b.dtype or a.shape != b.shape
            or not torch.equal(a.view(torch.uint8), b.view(torch.uint8))]


def layouts(out: Path, specs: list[str]) -> None:
    from r1_megatron.train import checkpointing as ckpt

    single_run = torch.load(out / "single.pt")
    want = single_run["pairs"]
    results = {}
    for i, spec in enumerate(specs):
        tp, pp, ep, etp, dp = (int(x) for x in spec.split(","))
        cfg = job_config(tp=tp, pp=pp, ep=ep, etp=etp, dp=dp, sequence_parallel=tp > 1, **DEVICE)
        if i == 0:
            start(cfg)
        trainer = build(cfg, dist.get_world_size())
        ckpt.load(trainer, single_run["init"], with_optimizer=False)
        everyone, counted, weight_bytes = stream(trainer, None)
        first_refit = scratch(trainer)
        to_rank0, _, _ = stream(trainer, 0)
        results[spec] = {
            "diff": compare(everyone, want),
            "diff_dst0": compare(to_rank0, want) if dist.get_rank() == 0 else len(to_rank0),
            "received": counted.bytes,
            "calls": counted.calls,
            "weight_bytes": weight_bytes,
            "scratch": (addresses(first_refit), addresses(scratch(trainer))),
        }
        del trainer, everyone, to_rank0, first_refit
        gc.collect()
    torch.save(results, out / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    mode, out_dir, *rest = sys.argv[1:]
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    single(path) if mode == "single" else layouts(path, rest)
