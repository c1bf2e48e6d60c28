"""Separate placement (`rollout.placement: separate`): vLLM engines in processes of their own, outside
the trainer's torch.distributed world, behind the `RolloutEngine` interface.

The trainer's rank 0 spawns `rollout.engines` processes (separate_worker.py) and talks to each over a
pipe; on GPU each engine gets its own `rollout.tp` devices through CUDA_VISIBLE_DEVICES, after the
trainer's. Because the engines never share the trainer's memory, `release` and `resume` are no-ops,
and rollout can run while the trainer trains (rollout.async: one_step, rl/async_rollout.py).

Prompts are divided among the engines in contiguous blocks. Each engine gets its block's keys
(engine.prompt_keys: the caller's keys, else the call number and the prompt's index in the
whole list, the in-process engine's own formula), which seed each sample, so a prompt samples the same
tokens on any engine and the samples equal the in-process engine's for the same keys.

Weights:
- CPU: one shared-memory buffer, laid out by the first refit's stream (names, shapes, dtypes) and
  reused by every later refit: the trainer copies the stream into it and sends each engine a short
  ("load", version); the engine loads from views of the same buffer
  through VLLMEngine.update_weights (the fast in-place refit, else reload_weights plus the CPU MoE
  re-pack). Measured 1.8 ms for 20 MiB (docs/cpu_platform.md), against 60-90 ms for pickled tensors.
- GPU: vLLM's weight-transfer API (`weight_transfer_config` backend nccl): rank 0 broadcasts each
  refit bucket to every engine worker over one NCCL group. Written against vLLM 0.32, not run here.

Health: every wait has a deadline (`rollout.timeout_s`; during generation, the longest an engine may
stay silent). An engine whose process died, whose pipe closed or which missed a deadline is killed
and started again (from the checkpoint, then the CPU buffer's weights), and its unfinished requests
are sent again, once per call. A second failure in the same call, or any failure on GPU after a
refit (the weights live only in the trainer), raises RolloutError naming the engine. The CPU canary
checks every engine: `logprobs` asks all of them and refuses engines that disagree with engine 0.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import torch

from r1_megatron.config.schema import RolloutConfig
from r1_megatron.rollout.engine import (
    GenSample,
    RolloutEngine,
    RolloutError,
    SamplingParams,
    in_prompt_order,
    prompt_keys,
)
from r1_megatron.rollout.separate_worker import Layout, buffer_views, serve

log = logging.getLogger(__name__)

_POLL_S = 0.2  # how often a wait looks at the engine processes between messages
_ALIGN = 64  # byte alignment of each tensor in the shared buffer


class EngineDown(RuntimeError):
    """Engine `index` stopped answering: its process died, its pipe closed or it missed a deadline."""

    def __init__(self, index: int, reason: str):
        self.index = index
        super().__init__(f"rollout engine {index} {reason}")


def stream_layout(pairs: list[tuple[str, torch.Tensor]]) -> tuple[Layout, int]:
    """Each tensor's (byte offset, shape, dtype) in a flat buffer, in stream order, and the buffer's size."""
    layout: Layout = {}
    offset = 0
    for name, tensor in pairs:
        if name in layout:
            raise ValueError(f"refit stream: {name!r} appears twice")
        layout[name] = (offset, tuple(tensor.shape), tensor.dtype)
        offset += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    return layout, max(offset, 1)


def engine_devices(index: int, tp: int, first: int) -> str:
    """CUDA_VISIBLE_DEVICES of engine `index`: `tp` devices after the `first` ones the trainer uses."""
    return ",".join(str(first + index * tp + k) for k in range(tp))


@dataclass
class _Proc:
    process: Any  # multiprocessing.Process
    conn: Connection
    pid: int = 0


class SeparateEngine(RolloutEngine):
    """`cfg.engines` vLLM engine processes, seen from the trainer as one RolloutEngine."""

    def __init__(self, model_dir: str | Path, cfg: RolloutConfig, device: str = "auto", threads: int = 0,
                 dummy_weights: bool = False):
        """threads: torch intra-op threads per engine process (0: torch's default). dummy_weights: the
        engines build from model_dir's config.json alone (VLLMEngine); the first refit loads weights."""
        self.model_dir, self.cfg, self.dummy_weights = Path(model_dir), cfg, dummy_weights
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if cfg.engines < 1:
            raise ValueError(f"rollout.engines must be >= 1, got {cfg.engines}")
        self.threads, self.weights_version, self.restarts = threads, 0, 0
        self._calls = 0
        self._shm: SharedMemory | None = None  # CPU: made by the first refit, whose tensors fix its layout
        self._views: dict[str, torch.Tensor] = {}
        self._layout: Layout = {}
        self._ctx = mp.get_context("spawn")
        self._procs: list[_Proc | None] = [None] * cfg.engines
        try:
            for e in range(cfg.engines):  # start them all, then wait: the builds overlap
                self._procs[e] = self._spawn(e)
            for e in range(cfg.engines):
                self._await_ready(e, retry=True)
            self._transfer = _NcclTransfer(self) if self.device == "cuda" else None
        except BaseException:
            self.close()
            raise

    # -- processes -----------------------------------------------------------------------------

    def _spawn(self, e: int) -> _Proc:
        env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        if self.device == "cuda":
            first = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # the trainer's devices on this node
            env["CUDA_VISIBLE_DEVICES"] = engine_devices(e, self.cfg.tp, first)
        spec = {"model_dir": str(self.model_dir), "cfg": self.cfg, "env": env, "threads": self.threads,
                "dummy_weights": self.dummy_weights}
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=serve, args=(child, spec), name=f"r1m-rollout-{e}", daemon=False)
        process.start()
        child.close()
        return _Proc(process, parent)

    def _await_ready(self, e: int, retry: bool) -> None:
        try:
            kind, *rest = self._recv(e, time.monotonic() + self.cfg.timeout_s, "start")
        except EngineDown as down:
            if not retry:
                raise RolloutError("startup", str(down)) from down
            log.warning("%s; starting it again", down)
            self._kill(e)
            self._procs[e] = self._spawn(e)
            return self._await_ready(e, retry=False)
        if kind != "ready":
            raise RolloutError("startup", f"rollout engine {e} could not start: {rest[-1]}")
        self._procs[e].pid = rest[0]

    def _kill(self, e: int) -> None:
        proc = self._procs[e]
        if proc is None:
            return
        if proc.process.is_alive():
            proc.process.kill()
        proc.process.join(timeout=10)
        proc.conn.close()
        self._procs[e] = None

    def _name(self, e: int) -> str:
        proc = self._procs[e]
        return f"rollout engine {e} (pid {proc.pid if proc else '?'})"

    def _recv(self, e: int, deadline: float, doing: str) -> tuple:
        """Engine e's next message, or EngineDown when it dies or `deadline` passes first."""
        proc = self._procs[e]
        while True:
            if proc.conn.poll(_POLL_S):
                try:
                    return proc.conn.recv()
                except (EOFError, OSError):
                    raise EngineDown(e, f"closed its pipe during {doing}") from None
            if not proc.process.is_alive():
                raise EngineDown(e, f"died during {doing} (exit code {proc.process.exitcode})")
            if time.monotonic() > deadline:
                raise EngineDown(e, f"gave no answer during {doing} within rollout.timeout_s={self.cfg.timeout_s}")

    def _send(self, e: int, msg: tuple) -> None:
        try:
            self._procs[e].conn.send(msg)
        except (BrokenPipeError, OSError):
            raise EngineDown(e, f"closed its pipe before {msg[0]}") from None

    def _restart(self, e: int, down: EngineDown, phase: str) -> None:
        """Start engine e again with the weights it held; RolloutError when that is impossible."""
        if self.device == "cuda" and self.weights_version:
            raise RolloutError(phase, f"{self._name(e)}: {down}; on GPU its weights exist only in the trainer, "
                               "so it cannot be restarted mid-step") from down
        log.warning("%s: %s; restarting it", self._name(e), down)
        self._kill(e)
        self.restarts += 1
        self._procs[e] = self._spawn(e)
        self._await_ready(e, retry=False)
        if self.weights_version:
            try:
                self._request(e, self._attach_message(), phase)
                self._request(e, ("load", self.weights_version), phase)
            except EngineDown as again:
                raise RolloutError(phase, f"{self._name(e)}: {again}, while restarting after: {down}") from again

    def _request(self, e: int, msg: tuple, phase: str) -> Any:
        """Send msg to engine e and return its answer (skipping leftovers of an abandoned generate)."""
        self._send(e, msg)
        deadline = time.monotonic() + self.cfg.timeout_s
        while True:
            kind, *rest = self._recv(e, deadline, phase)
            if kind == "ok":
                return rest[0]
            if kind == "error":
                raise RolloutError(phase, f"{self._name(e)}: {rest[-1]}")

    def _all(self, msg: tuple, phase: str) -> list[Any]:
        """msg to every engine, answers in engine order; a dead engine is restarted and asked again once."""
        for e in range(len(self._procs)):
            try:
                self._send(e, msg)
            except EngineDown:
                pass  # found by the wait below
        out, errors = [], []
        for e in range(len(self._procs)):  # every answer is read before raising: none is left in a pipe
            deadline = time.monotonic() + self.cfg.timeout_s
            try:
                while (answer := self._recv(e, deadline, phase))[0] not in ("ok", "error"):
                    pass
            except EngineDown as down:
                self._restart(e, down, phase)
                try:
                    answer = ("ok", self._request(e, msg, phase))
                except EngineDown as again:
                    raise RolloutError(phase, f"{self._name(e)}: {again}, again after a restart") from again
            if answer[0] == "error":
                errors.append(f"{self._name(e)}: {answer[-1]}")
            out.append(answer[1])
        if errors:
            raise RolloutError(phase, "; ".join(errors))
        return out

    def health(self) -> list[int]:
        """Ping every engine (restarting any that is dead); returns their pids."""
        return self._all(("ping",), "health check")

    # -- RolloutEngine -------------------------------------------------------------------------

    @property
    def holds_weights(self) -> bool:
        return not self.dummy_weights or self.weights_version > 0

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 keys: list[int] | None = None) -> list[list[GenSample]]:
        return in_prompt_order(self.generate_stream(prompts, n, sampling, keys), len(prompts))

    def generate_stream(
        self, prompts: list[list[int]], n: int, sampling: SamplingParams, keys: list[int] | None = None
    ) -> Iterator[tuple[int, list[GenSample]]]:
        """Each engine decodes its block of the prompts, with their keys; groups are yielded as any
        engine finishes one."""
        self.health()
        self._calls += 1
        tag, names = self._calls, prompt_keys(keys, self._calls, len(prompts))
        k = len(self._procs)
        bounds = [len(prompts) * e // k for e in range(k + 1)]
        todo = {e: list(range(bounds[e], bounds[e + 1])) for e in range(k) if bounds[e] < bounds[e + 1]}
        retried: set[int] = set()

        def issue(e: int) -> None:
            idx = todo[e]
            self._send(e, ("generate", tag, [prompts[i] for i in idx], n, sampling, [names[i] for i in idx]))
            sent[e], heard[e] = list(idx), time.monotonic()

        sent: dict[int, list[int]] = {}
        heard: dict[int, float] = {}
        for e in list(todo):
            try:
                issue(e)
            except EngineDown:
                heard[e], sent[e] = 0.0, []  # found dead by the loop below
        while todo:
            by_conn = {self._procs[e].conn: e for e in todo}
            for conn in wait(list(by_conn), timeout=_POLL_S):
                e = by_conn[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    continue  # is_alive() below sees the death
                heard[e] = time.monotonic()
                if msg[0] == "error":
                    raise RolloutError("generate", f"{self._name(e)}: {msg[-1]}")
                if msg[1] != tag:
                    continue  # from an earlier, abandoned call
                if msg[0] == "group":
                    i = sent[e][msg[2]]
                    todo[e].remove(i)
                    yield i, msg[3]
                elif msg[0] == "done":
                    if todo[e]:
                        raise RolloutError("generate", f"{self._name(e)} finished without prompts {todo[e]}")
                    del todo[e]
            for e in list(todo):
                proc = self._procs[e]
                reason = None
                if not proc.process.is_alive():
                    reason = f"died during generate (exit code {proc.process.exitcode})"
                elif time.monotonic() - heard[e] > self.cfg.timeout_s:
                    reason = f"was silent for more than rollout.timeout_s={self.cfg.timeout_s} during generate"
                if reason is None:
                    continue
                down = EngineDown(e, reason)
                if e in retried:
                    raise RolloutError("generate", f"{self._name(e)}: {down}, again after a restart") from down
                retried.add(e)
                self._restart(e, down, "generate")
                log.warning("re-issuing %d prompts to %s", len(todo[e]), self._name(e))
                issue(e)

    def logprobs(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Engine 0's teacher-forced logprobs, after checking every engine gives the same (the canary
        then checks each engine against the trainer)."""
        answers = self._all(("logprobs", token_ids), "logprobs")
        for e, other in enumerate(answers[1:], start=1):
            for i, (a, b) in enumerate(zip(answers[0], other, strict=True)):
                if not torch.equal(a, b):
                    err = float((a - b).abs().max())
                    raise RolloutError("logprobs", f"{self._name(e)} disagrees with engine 0 on canary sequence "
                                       f"{i} (max |logprob difference| {err:.3g}): its weights differ")
        return answers[0]

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None:
        version = self.weights_version + 1 if version is None else version
        if self._transfer is not None:
            self.refit_split = self._transfer.send(weights, version)
            self.weights_version = version
            return
        start, seen, first = time.perf_counter(), set(), self._shm is None
        if first:  # the first refit's tensors fix the buffer: copy them once to size it (an exporter
            # may reuse its buffers from one tensor to the next, so a reference is not enough)
            weights = [(name, tensor.detach().to("cpu", copy=True)) for name, tensor in weights]
            self._layout, size = stream_layout(weights)
            # A name of our own: vLLM's fixed per-group names collide across jobs and reruns (errno 17).
            self._shm = SharedMemory(name=f"r1m-{os.getpid()}-{uuid.uuid4().hex[:8]}", create=True, size=size)
            self._views = buffer_views(torch.frombuffer(self._shm.buf, dtype=torch.uint8), self._layout)
        for name, tensor in weights:
            view = self._views.get(name)
            if view is None:
                raise KeyError(f"refit: {name!r} was not in the first refit's stream (the engines' layout)")
            if view.shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)}, the engines hold {tuple(view.shape)}")
            view.copy_(tensor)
            seen.add(name)
        if missing := self._views.keys() - seen:
            raise RuntimeError(f"{len(missing)} tensors of the engines' layout not in the stream, e.g. "
                               f"{sorted(missing)[:3]}")
        copied = time.perf_counter() - start
        self.weights_version = version  # what a restarted engine reloads from the buffer
        if first:
            self._all(self._attach_message(), "update_weights")
        splits = self._all(("load", version), "update_weights")
        self.refit_split = {"shm_copy": copied, **splits[0]}

    def _attach_message(self) -> tuple:
        return ("attach", self._shm.name, self._layout)

    def release(self) -> None:
        """Nothing to free: the engines never hold the trainer's memory."""

    def resume(self) -> None:
        """Nothing to take back (see release)."""

    def close(self) -> None:
        for e, proc in enumerate(self._procs):
            if proc is not None:
                try:
                    proc.conn.send(("close",))
                    proc.process.join(timeout=10)
                except (BrokenPipeError, OSError):
                    pass
                self._kill(e)
        if self._shm is not None:
            self._views.clear()
            import gc

            gc.collect()  # the views export shm.buf; they must be gone before close
            self._shm.close()
            self._shm.unlink()
            self._shm = None


class _NcclTransfer:
    """GPU refits through vLLM's NCCL weight transfer: one group of rank 0 (the sender, this process)
    and every engine worker; each refit bucket is announced to the engines and broadcast. Not run here."""

    def __init__(self, owner: SeparateEngine):
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerInitInfo,
            NCCLTrainerWeightTransferEngine,
        )
        from vllm.utils.network_utils import get_open_port

        self.owner, tp = owner, owner.cfg.tp
        info = NCCLTrainerInitInfo(master_address="127.0.0.1", master_port=get_open_port(),
                                   world_size=1 + owner.cfg.engines * tp, rank=0)
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(info, client=self, source=_BucketSource([]))

    # The VLLMWeightSyncClient protocol, fanned out to every engine (worker ranks after the trainer's 0).
    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        tp = self.owner.cfg.tp
        for e in range(len(self.owner._procs)):
            payload = {**init_info, "rank_offset": 1 + e * tp}
            self.owner._send(e, ("rpc", "init_weight_transfer_engine", {"init_info": payload}))
        self._wait("init_weight_transfer_engine")

    def start_weight_update(self) -> None:
        self.owner._all(("rpc", "start_weight_update", {}), "update_weights")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        for e in range(len(self.owner._procs)):
            self.owner._send(e, ("rpc", "update_weights", {"update_info": update_info}))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.owner._all(("rpc", "finish_weight_update", {}), "update_weights")

    def _wait(self, phase: str) -> None:
        for e in range(len(self.owner._procs)):
            deadline = time.monotonic() + self.owner.cfg.timeout_s
            kind, *rest = self.owner._recv(e, deadline, phase)
            if kind == "error":
                raise RolloutError(phase, f"{self.owner._name(e)}: {rest[-1]}")

    def send(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> dict[str, float]:
        """Broadcast the stream bucket by bucket (each bucket: metadata to the engines, then the bytes)."""
        from dataclasses import asdict

        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

        from r1_megatron.rollout.refit import bucketize

        start = time.perf_counter()
        self.start_weight_update()
        for bucket in bucketize(weights, int(self.owner.cfg.bucket_mb * 2**20)):
            source = _BucketSource([(n, t.cuda(non_blocking=True)) for n, t in bucket])
            meta = source.metadata()
            self.update_weights(asdict(NCCLWeightTransferUpdateInfo(
                names=[m.name for m in meta], dtype_names=[str(m.dtype).split(".")[-1] for m in meta],
                shapes=[list(m.shape) for m in meta])))
            self.engine._broadcast(source, meta)  # the engines receive inside the same NCCL calls
            self._wait("update_weights")
        self.finish_weight_update()
        self.owner._all(("loaded", version), "update_weights")
        return {"nccl_transfer": time.perf_counter() - start}


def _bucket_source_class() -> type:
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class BucketSource(WeightSource):
        """One refit bucket as vLLM's WeightSource (metadata and iteration agree by construction)."""

        def __init__(self, pairs: list[tuple[str, torch.Tensor]]):
            self.pairs = pairs

        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.pairs]

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            return iter(self.pairs)

    return BucketSource


def _BucketSource(pairs: list[tuple[str, torch.Tensor]]) -> Any:  # noqa: N802 (a class, built lazily)
    return _bucket_source_class()(pairs)
