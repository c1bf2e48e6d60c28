"""Move the training state off the device between phases and bring it back bit-exactly (SPEC §7).

We work on *storages*, not tensors: megatron's DDP keeps every `main_grad` (and, with the distributed
optimizer, every param) as a view into one flat buffer, so offloading per tensor would copy shared
bytes twice and break the views. Each distinct storage is copied byte-for-byte into a host buffer
(pinned on GPU) and then resized to 0, which frees the device memory while every view, `Parameter`
object and optimizer reference stays valid. `reload()` resizes the storage back and copies the bytes
in, so the restore is bit-exact by construction. On CPU the "host" is the same memory kind, but the
mechanics (storage freed, restored) are identical, which is what the tests check.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator

import torch

log = logging.getLogger(__name__)


def _byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def optimizer_tensors(optimizer) -> Iterator[torch.Tensor]:
    """Every tensor an optimizer owns: its state (Adam moments, steps) and fp32 main params.

    Works for torch optimizers and megatron-core's wrappers (MixedPrecisionOptimizer keeps fp32 main
    params in `fp32_from_float16_groups`; ChainedOptimizer holds a list in `chained_optimizers`).
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        for state in inner.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v))
        for group in inner.param_groups:
            yield from group["params"]
        for groups in (getattr(opt, "fp32_from_float16_groups", None) or []):
            yield from groups


def model_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Params, buffers and megatron's `main_grad` / `.grad` of a module (DDP-wrapped or not)."""
    for p in module.parameters():
        yield p
        for grad in (getattr(p, "main_grad", None), p.grad):
            if grad is not None:
                yield grad
    # megatron's DDP shadows nn.Module.buffers with its list of param/grad buffers.
    yield from torch.nn.Module.buffers(module)


class Offloader:
    """Offloads a fixed set of tensors' storages to host memory and restores them.

    >>> off = Offloader([*model_tensors(model), *optimizer_tensors(opt)])
    >>> moved = off.offload()   # device storages now have size 0
    >>> off.reload()            # same bytes back, same tensor objects
    """

    def __init__(self, tensors: Iterable[torch.Tensor], pin_memory: bool = True):
        self._storages: dict[int, torch.UntypedStorage] = {}
        for t in tensors:
            storage = t.untyped_storage()
            if storage.nbytes() > 0:
                self._storages.setdefault(storage.data_ptr(), storage)
        self._host: dict[int, torch.Tensor] = {}
        self._nbytes: dict[int, int] = {}
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.offloaded = False

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self._storages.values()) if not self.offloaded else sum(self._nbytes.values())

    def offload(self) -> dict:
        """Copy every storage to host and free it on the device. Returns bytes moved and seconds."""
        if self.offloaded:
            raise RuntimeError("Offloader.offload() called twice without reload()")
        start = time.perf_counter()
        for key, storage in self._storages.items():
            src = _byte_view(storage)
            host = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=self.pin_memory)
            host.copy_(src, non_blocking=self.pin_memory)
            self._host[key], self._nbytes[key] = host, storage.nbytes()
        if self.pin_memory:
            torch.cuda.synchronize()
        for storage in self._storages.values():
            storage.resize_(0)
        self.offloaded = True
        return {"bytes": sum(self._nbytes.values()), "seconds": time.perf_counter() - start}

    def reload(self) -> dict:
        """Re-allocate every storage and copy its bytes back (bit-exact)."""
        if not self.offloaded:
            raise RuntimeError("Offloader.reload() called without offload()")
        start = time.perf_counter()
        for key, storage in self._storages.items():
            storage.resize_(self._nbytes[key])
            _byte_view(storage).copy_(self._host[key], non_blocking=self.pin_memory)
        if self.pin_memory:
            torch.cuda.synchronize()
        moved = sum(self._nbytes.values())
        self._host.clear()
        self.offloaded = False
        return {"bytes": moved, "seconds": time.perf_counter() - start}

    @contextlib.contextmanager
    def offloaded_during(self, phase: str = "rollout") -> Iterator[dict]:
        """`with off.offloaded_during("rollout") as stats:` frees the state for the block."""
        stats = {"offload": self.offload()}
        log.info("offload before %s: %.1f MB in %.3f s", phase, stats["offload"]["bytes"] / 2**20,
                 stats["offload"]["seconds"])
        try:
            yield stats
        finally:
            stats["reload"] = self.reload()


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device | str) -> Iterator[torch.nn.Module]:
    """Bring a host-resident module (the frozen reference) to `device` for one forward, then back.

    On CPU the device is the host, so this moves nothing.
    """
    home = next(module.parameters()).device
    if torch.device(device) == home:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
