"""Collectives on host-side statistics, through the device the group's backend takes.

NCCL only takes CUDA tensors; gloo takes CPU tensors (and a few ops on CUDA). Bookkeeping such as
expert-load counts, placements and token totals is built on the host, so every collective on it goes
through `all_reduce_`, which moves the tensor to the backend's device and back. A tensor that already
lives there is reduced in place, with no copy. tests/unit/test_collectives.py also walks the source tree
and fails on a raw collective over a tensor created without a device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def device_for_backend(backend: str) -> torch.device:
    """The device whose tensors `backend` reduces: CPU when it has a CPU-capable component (gloo,
    mpi, ucc, or a "cpu:gloo,cuda:nccl" pair), the current CUDA device for NCCL alone."""
    parts = {p.split(":")[-1] for p in str(backend).lower().split(",")}
    if parts & {"gloo", "mpi", "ucc"}:
        return torch.device("cpu")
    if "nccl" in parts:
        return torch.device("cuda")
    raise ValueError(f"collectives: unknown torch.distributed backend {backend!r}")


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device for tensors handed to collectives over `group` (default: the world)."""
    return device_for_backend(dist.get_backend(group))


def all_reduce_(
    tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """All-reduce `tensor` in place over `group` on the backend's device; returns `tensor`."""
    device = collective_device(group)
    if tensor.device.type == device.type:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op, group=group)
    return tensor.copy_(moved)
