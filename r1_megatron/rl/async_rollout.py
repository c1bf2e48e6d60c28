"""Where each GRPO step's batch comes from: on-policy (rollout.async: off) or one step off-policy
(rollout.async: one_step, with separate engines), see the loop's docstring for the loss.

One step off: the engines are refitted with the trainer's weights after step k-1 and immediately
start generating batch k+1 in the background while the trainer trains on batch k (generated with
the weights after step k-1, so one version stale). Only the engine-hosting rank (rank 0) generates
and scores, in one background thread; nothing in that thread is a collective, so the trainer's
collectives in the main thread cannot interleave with it. The batch reaches the other ranks by a
broadcast at the start of the next step, in the main thread.

Every sample carries `policy_version`: the number of GRPO steps the weights that sampled it had
taken. Staleness = the trainer's step - policy_version: 0 on-policy, 1 after the first step here.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch.distributed as dist

from r1_megatron.rl.types import RolloutBatch


def staleness_metrics(batch: RolloutBatch, step: int) -> dict[str, float]:
    """How many GRPO steps behind the trainer the weights that sampled the batch were."""
    lag = [step - s.policy_version for s in batch.samples]
    return {"async/staleness_mean": sum(lag) / max(len(lag), 1), "async/staleness_min": float(min(lag, default=0)),
            "async/staleness_max": float(max(lag, default=0))}


def _stamp(batch: RolloutBatch, version: int) -> RolloutBatch:
    for s in batch.samples:
        s.policy_version = version
    return batch


class OnPolicy:
    """Refit, then generate with exactly the trainer's weights. With offload (offload.TrainerOffload),
    the trainer's state leaves in RunState.refit's order and comes back after the rollout."""

    def __init__(self, run: Any, offload: Any = None):
        self.run, self.offload = run, offload
        self.data_position = run.prompts.position

    def next(self, step: int, timer: Any) -> tuple[RolloutBatch, dict, dict]:
        """(batch, rollout stats, refit metrics) for GRPO step `step`."""
        try:
            with timer("refit"):
                refit = self.run.refit(self.offload)
            with timer("rollout"):
                batch, kept = self.run.rollout()  # the engine sleeps at its end (GPU)
        finally:
            # Also when the refit or the rollout fails: the trainer's state comes back to the device,
            # so the caller may still read or save the model (an offloaded param has no storage).
            if self.offload is not None:
                self.offload.reload()
        self.data_position = self.run.prompts.position
        return _stamp(batch, step), kept, refit

    def wait(self) -> None:
        """Nothing runs in the background."""

    def close(self) -> None:
        """Nothing to stop."""


class OneStepOff:
    """Batch k+1 generates on the engines while the trainer trains on batch k."""

    def __init__(self, run: Any, steps: int):
        self.run, self.steps = run, steps
        self.host = run.engine is not None  # the engine-hosting rank generates; the others wait for it
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="r1m-rollout") if self.host else None
        self._pending: Future | None = None
        self._waited: tuple | None = None
        self.data_position = run.prompts.position

    def _generate(self, version: int) -> tuple:
        """Runs on the host rank (in the background thread after the first step): rounds of generation
        and scoring without collectives. A failure is returned, to be raised on every rank."""
        try:
            batch, kept = self.run.rollout(gather=_sorted)
        except Exception as e:  # noqa: BLE001 (see _share)
            return None, f"{type(e).__name__}: {e}", e
        return _stamp(batch, version).samples, kept, self.run.prompts.position

    def _share(self, local: tuple | None) -> tuple[RolloutBatch, dict]:
        """Every rank gets the host's batch, or its failure (so no rank waits for a batch that never
        comes); the prompt stream advances alike on every rank."""
        box = [local if local is None or local[0] is not None else local[:2]]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        if box[0][0] is None:
            if local is not None:
                raise local[2]
            raise RuntimeError(f"rollout on rank 0 failed: {box[0][1]}")
        samples, kept, position = box[0]
        self.run.prompts.position = position
        return RolloutBatch(samples), kept

    def wait(self) -> None:
        """Let the background generation finish (before anything else uses the engines, e.g. eval)."""
        if self._pending is not None:
            self._waited, self._pending = self._pending.result(), None

    def next(self, step: int, timer: Any) -> tuple[RolloutBatch, dict, dict]:
        if self._pending is None and self._waited is None:  # the first step (also after a resume)
            with timer("refit"):
                refit = self.run.refit()
            with timer("rollout"):
                batch, kept = self._share(self._generate(step) if self.host else None)
        else:
            with timer("rollout_wait"):  # what generation did not hide behind the last step's training
                self.wait()
                batch, kept = self._share(self._waited)
                self._waited = None
            with timer("refit"):  # the engines are idle now: give them this step's weights
                refit = self.run.refit()
        self.data_position = self.run.prompts.position  # a checkpoint resumes after this batch, not the next
        if self.host and step + 1 < self.steps:
            self._pending = self._thread.submit(self._generate, step)
        return batch, kept, refit

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)


def _sorted(local: list) -> list:
    return sorted(local, key=lambda s: (s.group_id, s.sample_index))


def make(run: Any, cfg: Any, offload: Any = None) -> OnPolicy | OneStepOff:
    """The batch source for cfg.rollout.async (ConfigErrors for bad combinations come from validate)."""
    if cfg.rollout.async_ == "one_step":
        return OneStepOff(run, cfg.rl.steps)
    return OnPolicy(run, offload)
