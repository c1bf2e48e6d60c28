"""Move the training state off the device between phases and bring it back bit-exactly (docs/architecture.md).

We work on *storages*, not tensors: megatron's DDP keeps every `main_grad` (and, with the distributed
optimizer, every param) as a view into one flat buffer, so offloading per tensor would copy shared
bytes twice and break the views. Each distinct storage is copied byte-for-byte into a host buffer
(pinned on GPU) and then resized to 0, which frees the device memory while every view, `Parameter`
object and optimizer reference stays valid. `reload()` resizes the storage back and copies the bytes
in, so the restore is bit-exact by construction. On CPU the "host" is the same memory kind, but the
mechanics (storage freed, restored) are identical, which is what the tests check.

The set of storages is collected at every `offload()`, not once: Adam's moments are created at the
first optimizer step, after the loop has built its offloaders, and megatron may re-create buffers.

`TrainerOffload` splits the trainer's state in two for the refit order of verl and NeMo-RL
(rl/session.py `RunState.refit`, rollout/refit.py `Refitter.refit`): (1) grads and optimizer state
leave the device, (2) the engine wakes its weights, (3) the refit streams the trainer's params into
them, (4) the params leave, (5) the engine wakes its KV cache. The peak is then max(trainer, params +
engine weights), never trainer + engine weights + KV cache.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator

import torch


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


def param_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Params and buffers of a module (DDP-wrapped or not): what a refit reads."""
    yield from module.parameters()
    # megatron's DDP shadows nn.Module.buffers with its list of param/grad buffers.
    yield from torch.nn.Module.buffers(module)


def grad_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """megatron's `main_grad` (views into DDP's grad buffer) and `.grad` of every param."""
    for p in module.parameters():
        yield from (g for g in (getattr(p, "main_grad", None), p.grad) if g is not None)


def model_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Params, buffers and megatron's `main_grad` / `.grad` of a module (DDP-wrapped or not)."""
    yield from param_tensors(module)
    yield from grad_tensors(module)


Tensors = Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]]


class Offloader:
    """Offloads tensors' storages to host memory and restores them.

    `tensors` is a fixed collection or a callable returning the tensors; either way the storages are
    gathered anew at each `offload()`, so tensors created after construction (a callable's) count.

    >>> off = Offloader(lambda: [*model_tensors(model), *optimizer_tensors(opt)])
    >>> moved = off.offload()   # device storages now have size 0
    >>> off.reload()            # same bytes back, same tensor objects
    """

    def __init__(self, tensors: Tensors, pin_memory: bool = True):
        self._collect = tensors if callable(tensors) else (lambda fixed=list(tensors): fixed)
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._host: dict[int, torch.Tensor] = {}
        self._nbytes: dict[int, int] = {}
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.offloaded = False

    def _gather(self) -> dict[int, torch.UntypedStorage]:
        storages: dict[int, torch.UntypedStorage] = {}
        for t in self._collect():
            storage = t.untyped_storage()
            if storage.nbytes() > 0:
                storages.setdefault(storage.data_ptr(), storage)
        return storages

    @property
    def nbytes(self) -> int:
        """Bytes offloaded now, or that an offload now would move."""
        if self.offloaded:
            return sum(self._nbytes.values())
        return sum(s.nbytes() for s in self._gather().values())

    def offload(self) -> dict:
        """Copy every storage to host and free it on the device. Returns bytes moved and seconds."""
        if self.offloaded:
            raise RuntimeError("Offloader.offload() called twice without reload()")
        start = time.perf_counter()
        self._storages = self._gather()
        self._nbytes = {}
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


class TrainerOffload:
    """The trainer's state in two parts for the refit order (module doc): `state` (grads, optimizer
    state, fp32 main params; never a storage the model's params live in) and `params` (what the
    refit reads). Both collect their tensors at each offload.

    >>> off = TrainerOffload(trainer.model[0], trainer.optimizer)
    >>> off.state.offload(); <stream the refit>; off.params.offload(); <rollout>; off.reload()
    """

    def __init__(self, model: torch.nn.Module, optimizer, pin_memory: bool = True):
        def params() -> list[torch.Tensor]:
            return list(param_tensors(model))

        def state() -> Iterator[torch.Tensor]:
            # A plain torch optimizer's param groups are the model's params themselves: they stay.
            keep = {t.untyped_storage().data_ptr() for t in params()}
            for t in (*grad_tensors(model), *optimizer_tensors(optimizer)):
                if t.untyped_storage().data_ptr() not in keep:
                    yield t

        self.state = Offloader(state, pin_memory)
        self.params = Offloader(params, pin_memory)

    def reload(self) -> dict:
        """Bring back whatever is offloaded, params first. Returns bytes and seconds."""
        moved = [off.reload() for off in (self.params, self.state) if off.offloaded]
        return {"bytes": sum(m["bytes"] for m in moved), "seconds": sum(m["seconds"] for m in moved)}


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
