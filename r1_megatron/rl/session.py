"""Setting up a GRPO run: initial weights, the frozen reference, the rollout engine, the canary.

Kept apart from loop.py so the loop itself reads as prose."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from r1_megatron.config.schema import JobConfig
from r1_megatron.model.attention import supports_shared_prefix
from r1_megatron.offload import TrainerOffload
from r1_megatron.rollout.weight_export import export_weights
from r1_megatron.train import checkpointing as dist_ckpt
from r1_megatron.train.forward import ForwardModel as Reference
from r1_megatron.train.metrics import is_rank0
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
    pool, prompt stream, refitter. Methods are the loop's verbs (refit, rollout, prepare, ...)."""

    def __init__(self, cfg: JobConfig, engine=None, pool=None):
        """engine/pool: a prebuilt engine (one per rank, tp 1) and reward pool; by default the engine
        comes from rollout/placement.py, built before the trainer takes any memory."""
        from r1_megatron.data.tokenizer import job_tokenizer
        from r1_megatron.parallel.groups import init_process_groups
        from r1_megatron.rl.grpo import PromptStream
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

    def _tokenizer_dir(self) -> Path:
        from r1_megatron.data.tokenizer import tokenizer_dir

        return tokenizer_dir(self.cfg)

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
        """Generate and score one batch (each engine its share of the prompts), with dynamic sampling.
        gather: None, the collective default (grpo.gather_samples; a failure on any rank raises on all,
        see agree); else a local function joining this rank's samples of each round, for a rank that
        generates alone and without collectives (rl/async_rollout.py), whose failures raise here."""
        from r1_megatron.rl import grpo
        from r1_megatron.rl.advantages import all_equal_groups
        from r1_megatron.rl.types import RolloutBatch
        from r1_megatron.rollout.placement import agree

        rl = self.cfg.rl
        kept: list = []
        rounds = all_equal = seen = 0
        while True:
            need = rl.prompts_per_step - len(kept) // rl.group_size
            first = self.prompts.position  # stream index of items[0]: seeds the samples of each prompt
            items = self.prompts.take(need)
            mine = self.slot.share(need)
            local, error = [], None
            try:
                pool = self.pool if self.slot.leader else None
                if mine:
                    local = grpo.generate_and_score(self.engine, pool, self.tokenizer, [items[i] for i in mine],
                                                    [seen + i for i in mine], self.cfg,
                                                    keys=[first + i for i in mine])
            except Exception as e:  # noqa: BLE001 (every rank must learn of it: see agree)
                if gather is not None:
                    raise
                error = e
            if gather is None:
                agree(self.slot, error, "rollout")
            batch = RolloutBatch((gather or grpo.gather_samples)(local))
            seen, rounds = seen + need, rounds + 1
            flat = all_equal_groups(batch.rewards()[batch.group_index()])
            all_equal += int(flat.sum())
            last_round = not rl.dynamic_sampling or rounds > rl.max_resample_rounds
            kept += (batch if last_round else batch.select_groups([not f for f in flat.tolist()])).samples
            if last_round or len(kept) >= rl.prompts_per_step * rl.group_size:
                break
        if self.engine is not None:
            self.engine.release()  # GPU: vLLM sleeps (weights, KV cache) before the trainer reloads
        stats = {"all_equal_frac": all_equal / max(seen, 1), "sampling_rounds": float(rounds)}
        if self.pool is not None:
            stats.update(self.pool.stats(reset=True))  # this rank's pool (rank 0's is logged)
        return RolloutBatch(kept), stats

    def prepare(self, batch):
        """Advantages, then per minibatch: packed microbatches with old (unless fused into the training
        forward, grpo.fuses_old_logprobs) and reference logprobs."""
        from r1_megatron.rl import corrections, grpo, router_replay
        from r1_megatron.rl.advantages import assign_advantages

        rl, max_len = self.cfg.rl, self.cfg.rollout.max_new_tokens
        self.step_routing = {}
        seq_k1 = None
        if rl.kl_in == "reward" and rl.kl_coef > 0:
            seq_k1 = self._sequence_k1(batch)
        adv_metrics = assign_advantages(batch, rl, max_len, seq_k1)
        parts = []
        for part in grpo.minibatches(batch, rl.num_minibatches):
            mbs = grpo.microbatches(part, self.cfg.data.seq_length, self.layout.micro_batch_size,
                                    share_prompts=rl.share_prompts)
            routing = router_replay.StepRouting(self.trainer, mbs, part.samples, rl)
            if not grpo.fuses_old_logprobs(rl):
                with routing.old_pass():
                    grpo.attach_logprobs(self.trainer, mbs, "old_logprobs")
            self.step_routing[id(mbs)] = (routing, not grpo.fuses_old_logprobs(rl))
            if self.reference is not None and rl.kl_in == "loss":
                for mb, lp in zip(mbs, self.reference.logprobs(mbs), strict=True):
                    mb.extras["ref_logprobs"] = lp
            norm = part.loss_norm(max_len)
            if corrections.enabled(rl):  # removed tokens leave the numerator and the normalizer
                adv_metrics.update(corrections.apply_masks(mbs, rl))
                norm = corrections.masked_norm(mbs, max_len)
            parts.append((mbs, norm))
        return parts, adv_metrics

    def update_routing(self, mbs):
        """Context around the update of `mbs` (prepared above): router replay and routing mismatch."""
        routing, old_pass_ran = self.step_routing[id(mbs)]
        return routing.update(old_pass_ran)

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
        """position: where a resumed run continues the prompt stream (default: after the last prompt
        drawn; one-step-off rollout passes the end of the last trained batch)."""
        position = self.prompts.position if position is None else position
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
