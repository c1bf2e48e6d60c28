"""Device choice, seeding, and a one-process megatron world for tools and tests.

`single_rank_world()` is what `r1m convert`, `r1m score` and single-rank tests use: a gloo process
group of size 1 over a FileStore (no ports) and megatron's parallel_state with every size 1.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from r1_megatron.parallel import compat_cpu


def select_device(pref: str = "auto") -> torch.device:
    """'auto' -> the local CUDA device when there is one, else the CPU; 'cpu'/'cuda' as asked."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("parallel.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if pref not in ("auto", "cpu"):
        raise ValueError(f"parallel.device: {pref!r} is not one of ['auto', 'cpu', 'cuda']")
    return torch.device("cpu")


def seed_all(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker (CPU or CUDA)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def single_rank_world(seed: int = 0, device: torch.device | None = None) -> torch.device:
    """Initialize (once) a world_size=1 process group and megatron parallel_state; seed everything.

    Returns the device to build models on. Safe to call repeatedly (later calls only reseed).
    """
    device = device or select_device()
    if device.type != "cuda":
        compat_cpu.activate()
    if not dist.is_initialized():
        path = tempfile.mkstemp(prefix="r1m_store_")[1]
        atexit.register(_remove_quietly, path)
        store = dist.FileStore(path, 1)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    seed_all(seed)
    return device


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
