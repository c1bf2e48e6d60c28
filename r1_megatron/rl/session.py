"""The one object of a GRPO run: its setup (initial weights, the frozen reference, the rollout engine,
the reward pool, the canary) and every step of the loop as a verb on it (refit, rollout, prepare,
train, evaluate, save), so that rl/loop.py reads as prose and calls nothing else."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from r1_megatron.config.schema import JobConfig
from r1_megatron.model.attention import supports_shared_prefix
from r1_megatron.offload import TrainerOffload
from r1_megatron.rl import async_rollout, loss, prepare, rollout_phase
from r1_megatron.rl.prompts import PromptStream
from r1_megatron.rl.timing import PhaseTimer
from r1_megatron.rollout.weight_export import export_weights
from r1_megatron.train import checkpointing as dist_ckpt
from r1_megatron.train.forward import ForwardModel as Reference
from r1_megatron.train.metrics import MetricsLogger, is_rank0
from r1_megatron.train.microbatch import Microbatch
from r1_megatron.train.trainer import Trainer
from r1_megatron.train.weights import load_initial_weights


def canary_batch(tokens: list[list[int]]) -> Microbatch:
    t = torch.tensor(tokens, dtype=torch.long)
    labels = torch.zeros_like(t)
    labels[:, :-1] = t[:, 1:]
    return Microbatch(t, labels, torch.ones_like(t, dtype=torch.float32), torch.arange(t.shape[1]).expand_as(t).clone())


def canary_reference(trainer: Trainer, tokens: list[list[int]]) -> torch.Tensor:
    """The trainer's logprobs of tokens[1:] for each canary sequence ([n, L - 1], fp32)."""
    (lp,) = trainer.forward_logprobs([canary_batch(tokens)])
    return lp[:, : len(tokens[0]) - 1]


def weight_stream(trainer: Trainer, bucket_mb: int):
    """The refit stream: every rank takes part in the gather. Colocated, every rank receives the full
    tensors, which its vLLM rank cuts into its own shard; separate, only rank 0 (the engines') does."""
    dst = 0 if trainer.cfg.rollout.placement == "separate" else None
    return export_weights(trainer.unwrapped, trainer.cfg.model, bucket_mb * 2**20, dst=dst)


class RunState:
    """Everything a GRPO run holds between steps: process groups, trainer, reference, engine, reward
    pool, prompt stream, refitter. Methods are the loop's verbs (refit, rollout, prepare, train, ...);
    the algorithm of each phase is in its own module (rl/prompts.py, rl/rollout_phase.py,
    rl/prepare.py with rl/batching.py, rl/loss.py)."""

    def __init__(self, cfg: JobConfig, engine=None, pool=None):
        """engine/pool: a prebuilt engine (one per rank, tp 1) and reward pool; by default the engine
        comes from rollout/placement.py, built before the trainer takes any memory."""
        from r1_megatron.data.tokenizer import job_tokenizer
        from r1_megatron.parallel.groups import init_process_groups
        from r1_megatron.rollout.placement import build_rollout, colocated_slot
        from r1_megatron.rollout.refit import Refitter, canary_sequences, canary_tolerance

        self.cfg = cfg
        self.run_dir = Path(cfg.logging.run_dir)
        self.ckpt_root = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        self.layout, self.device = init_process_groups(cfg)
        if engine is None:
            self.engine, self.slot = build_rollout(cfg, self.device)
        else:
            self.engine, self.slot = engine, colocated_slot(1, dist.get_rank(), dist.get_world_size())
        self.tokenizer = job_tokenizer(cfg)
        self.trainer = Trainer(cfg, self.layout, self.device)
        if cfg.rl.share_prompts and not supports_shared_prefix(self.trainer.unwrapped):
            raise ValueError(
                "rl.share_prompts=true needs attention that lets a response see its group's shared prompt: "
                "the local spec's MLA (CPU path, DeepSeek-V3 cards). This model's attention layers do not "
                f"(device {self.device.type}, arch {cfg.model.arch}); set rl.share_prompts=false")
        extra = dist_ckpt.resume(self.trainer, self.ckpt_root) if cfg.checkpoint.resume else None
        if extra is None:
            load_initial_weights(self.trainer, cfg.checkpoint.load)
        self.prompts = PromptStream(cfg, self.tokenizer, position=(extra or {}).get("data_position", 0))
        self.reference = Reference(cfg, self.layout, self.device) if cfg.rl.kl_coef > 0 else None
        self.canary_prompts = canary_sequences(cfg.model.vocab_size, cfg.rl.canary_length)
        self.pool = pool
        if self.slot.leader and self.pool is None:  # only an engine's first rank scores
            from r1_megatron.reward.pool import RewardPool

            self.pool = RewardPool(cfg.reward)
        tol = cfg.rl.canary_tol if cfg.rl.canary_tol is not None else \
            canary_tolerance(cfg.rollout.dtype, next(self.trainer.unwrapped.parameters()).dtype)
        # Separate placement: only rank 0 drives the engines; the other ranks only join the collectives.
        self.refitter = Refitter(self.engine, cfg.rollout.bucket_mb, tol, self.canary_prompts,
                                 cfg.rl.canary_length) if self.engine is not None else None
        self._bar = None
        self.batches = None  # the loop's batch source, from `begin`

    def _tokenizer_dir(self) -> Path:
        from r1_megatron.data.tokenizer import tokenizer_dir

        return tokenizer_dir(self.cfg)

    # -- what one call of the loop opens, and the step's bookkeeping -------------------------------
    def begin(self, cfg: JobConfig) -> None:
        """Open the loop's state: the trainer offload, the metrics log, the batch source (on policy or
        one step off, rl/async_rollout.py). cfg: the config the loop was called with (the run's own, or
        the same with other rl.steps, as bench/grpo_vs_trl.py calls it)."""
        self.loop_cfg = cfg
        # Collected at each offload: Adam's moments appear only at the first step (offload/).
        self.offload = TrainerOffload(self.trainer.model[0], self.trainer.optimizer, cfg.offload.pin_memory) \
            if cfg.offload.enabled else None
        self.metrics_log = MetricsLogger(cfg.logging, self.run_dir)
        self.batches = async_rollout.make(self, cfg, self.offload)

    def end(self) -> None:
        """Close what `begin` opened: the batch source (its rollout thread) and the metrics log."""
        self.batches.close()
        self.metrics_log.close()

    def steps(self):
        """The steps left (from the trainer's step, after a resume), under the progress bar."""
        return self.progress(range(self.trainer.step, self.loop_cfg.rl.steps))

    def next_batch(self, step: int) -> tuple:
        """Start step `step` with a fresh phase timer (self.timer) and get its batch: refit + rollout.
        Returns (batch, rollout stats, refit metrics)."""
        self.timer = PhaseTimer()
        return self.batches.next(step, self.timer)

    def step_metrics(self, step: int, batch, adv_metrics: dict, kept: dict, train_metrics: dict,
                     refit: dict) -> dict:
        """One step's log line: rollout, advantage, sampling, update and refit metrics, phase times,
        staleness, then the engine's tokens/s and draft acceptance (rank 0's engine)."""
        return {**rollout_phase.rollout_metrics(batch), **adv_metrics, **kept, **train_metrics, **refit,
                **self.timer.metrics(), **async_rollout.staleness_metrics(batch, step),
                **getattr(self.engine, "generate_stats", {})}

    def eval_due(self, step: int) -> bool:
        """Every rl.eval_every steps, but not after the last one."""
        rl = self.loop_cfg.rl
        return bool(rl.eval_every and (step + 1) % rl.eval_every == 0 and step + 1 < rl.steps)

    def wait_rollout(self) -> None:
        """Let the engines finish the next batch (one step off) before anything else uses them."""
        self.batches.wait()

    def log(self, step: int, metrics: dict) -> None:
        """Append the step's metrics to metrics.jsonl (and TB/wandb) and show them on the progress bar."""
        self.metrics_log.log(step + 1, metrics)
        self.show(metrics)

    def save_due(self, step: int) -> bool:
        """Every checkpoint.save_every steps."""
        every = self.loop_cfg.checkpoint.save_every
        return bool(every and (step + 1) % every == 0)

    # -- the loop's verbs ---------------------------------------------------------------------
    def refit(self, offload: TrainerOffload | None = None) -> dict:
        """Stream the trainer's weights into every engine; the canary compares each engine's logprobs
        with the trainer's (docs/hf_format.md). A failure on any rank raises one EngineFailure on all. With
        `offload`, in the order of offload/'s module doc: grads and optimizer state leave before the
        engine wakes its weights, the params once the stream is in, before the KV cache wakes."""
        from r1_megatron.rollout.placement import agree

        tokens = self._canary_tokens()
        reference = canary_reference(self.trainer, tokens)
        if offload is not None:
            offload.state.offload()
        after_load = offload.params.offload if offload is not None else None
        if self.refitter is not None:
            self.refitter.canary_tokens = tokens
        stream = weight_stream(self.trainer, self.cfg.rollout.bucket_mb)
        error, report = None, None
        try:
            if self.refitter is None:  # separate placement, rank > 0: only the gather's collectives
                for _ in stream:
                    pass
                if after_load is not None:
                    after_load()
            else:
                report = self.refitter.refit(stream, reference=reference, after_load=after_load)
        except Exception as e:  # noqa: BLE001 (every rank must learn of it: see agree)
            error = e
            for _ in stream:  # each bucket is a collective: finish it so no rank is left waiting
                pass
            if after_load is not None and not offload.params.offloaded:
                after_load()
        agree(self.slot, error, "refit" if self.refitter is None else
              f"refit to weights version {self.refitter.version}")
        if report is None:
            return {}
        return {"refit/version": report["version"], "refit/bytes": report["bytes"],
                "refit/seconds": report["seconds"], "refit/canary_mean_err": report["canary_mean_err"],
                "refit/canary_max_err": report["canary_max_err"],
                **{f"refit/{part}_s": s for part, s in report["split"].items()}}

    def _canary_tokens(self) -> list[list[int]]:
        """Rank 0's canary (its engine sampled it), the same on every rank: the trainer's forward
        that scores it is collective, and every engine checks the same tokens."""
        box = [self.refitter.canary_tokens if self.refitter is not None else None]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def rollout(self, gather=None):
        """Generate and score one batch, with dynamic sampling (rl/rollout_phase.py `collect`).
        gather: None, the collective default; else a local function joining this rank's samples, for a
        rank that generates alone and without collectives (rl/async_rollout.py)."""
        return rollout_phase.collect(self.cfg, self.prompts, self.engine, self.pool, self.slot,
                                     self.tokenizer, gather)

    def prepare(self, batch):
        """Advantages, then per minibatch: packed microbatches with old (unless fused into the training
        forward, loss.fuses_old_logprobs) and reference logprobs (rl/prepare.py)."""
        rl = self.cfg.rl
        seq_k1 = None
        if rl.kl_in == "reward" and rl.kl_coef > 0:
            seq_k1 = self._sequence_k1(batch)
        parts, adv_metrics, self.step_routing = prepare.prepare(
            batch, self.cfg, self.trainer, self.layout.micro_batch_size, self.reference, seq_k1)
        return parts, adv_metrics

    def train(self, parts: list) -> dict:
        """The optimizer steps over the prepared minibatches (rl/loss.py `update`); the last one's metrics."""
        return loss.update(self.trainer, self.loop_cfg.rl, parts, self.step_routing)

    def _sequence_k1(self, batch) -> torch.Tensor:
        """Per-sequence sum of k1 = log pi_old - log pi_ref over response tokens (KL in the reward)."""
        from r1_megatron.rl.types import sequence_tensors

        out = []
        for s in batch.samples:
            q = sequence_tensors(s)
            mb = canary_batch([q.tokens.tolist()])
            (old,) = self.trainer.forward_logprobs([mb])
            (ref,) = self.reference.logprobs([mb])
            out.append(float(((old - ref)[0] * q.loss_mask).sum()))
        return torch.tensor(out)

    def evaluate(self, n: int | None = None) -> float:
        """Held-out pass@1 of the trainer's current weights (refit first; mean over rl.eval_samples
        samples, T=0.6, top-p 0.95); the same value on every rank."""
        from r1_megatron.eval.runner import heldout_correct

        self.refit()
        # Each engine scores its share of the items (its leader scores); the sums meet on every rank.
        correct = []
        if self.engine is not None:
            correct = heldout_correct(self.engine, self.pool if self.slot.leader else None, self.tokenizer,
                                       self.cfg, n, share=self.slot.share)
            self.engine.release()
        total = torch.tensor([sum(correct), len(correct)], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1].clamp(min=1))

    def save(self, position: int | None = None) -> None:
        """position: where a resumed run continues the prompt stream (default: where the loop's batch
        source stands, which one-step-off rollout keeps at the end of the last trained batch; without
        one, after the last prompt drawn)."""
        if position is None:
            position = self.batches.data_position if self.batches is not None else self.prompts.position
        dist_ckpt.save(self.trainer, self.ckpt_root, extra={"data_position": position})

    def progress(self, steps):
        if not (is_rank0() and self.cfg.logging.progress):
            return steps
        from tqdm import tqdm

        self._bar = tqdm(steps, desc="GRPO", unit="step", dynamic_ncols=True)
        return self._bar

    def show(self, metrics: dict) -> None:
        if self._bar is not None:
            self._bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                                  acc=f"{metrics.get('accuracy', float('nan')):.2f}")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.engine is not None:
            self.engine.close()
