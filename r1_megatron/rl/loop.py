"""The GRPO loop (DeepSeek-R1 §2.2), on one screen:

  refit the engine from the trainer (canary-checked; the trainer's grads and optimizer state leave
  the device before the engine wakes its weights, its params after the stream, before the KV cache
  wakes: offload/) -> generate G samples per prompt while the reward pool scores finished groups ->
  reload the trainer -> reference logprobs
  (and old ones, unless the training forward gives them: rl.old_logprob_pass) -> group advantages ->
  packed microbatches -> train_step with the GRPO loss -> log, save.

The MTP head: by default (rl.mtp_loss_coef = 0) it is not run in RL steps, since its loss on the
policy's own samples would be an SFT term. When it drafts the rollouts (rollout.speculative) it
should follow the policy: rl.mtp_loss_coef > 0 adds that loss with the trunk detached
(rl.mtp_detach_trunk, default), so only the head learns the policy's next-next token and the
policy's gradients stay those of the GRPO loss (rl/mtp.py); every refit carries the head to vLLM's drafter.
Departures from the paper are config switches (docs/grpo.md): Dr. GRPO / leave-one-out baselines,
clip-higher, dynamic sampling, overlong shaping, TIS, KL in the reward instead of the loss.

One step off policy (rollout.async: one_step, separate engines; rl/async_rollout.py): the engines
generate batch k+1 with the weights after step k-1 while the trainer trains on batch k, so each
trained sample (after the first step) comes from weights one step older than the trainer's. The loss
is then the decoupled objective (Hilton et al. 2021, "Batch size-invariance for policy optimization"):
the clipped ratio is taken against the proximal policy pi_old, which the trainer recomputes at its
current weights (the old-logprob pass, or the training forward itself when fused), and each token
is weighted by the truncated importance ratio of the proximal to the behaviour policy,

  L = sum_t w_t * min(pi_old/pi_rollout, rl.tis) * max(-A r_t, -A clip(r_t, 1-eps_low, 1+eps_high)),
  r_t = pi_theta/pi_old,

with pi_rollout the engine's sampling logprobs (the same TIS term that corrects the vLLM/trainer
mismatch on policy, so rl.tis is required). The log reports async/staleness_{mean,min,max}.
"""

from __future__ import annotations

from r1_megatron.config import JobConfig
from r1_megatron.offload import TrainerOffload
from r1_megatron.rl import async_rollout, grpo, session
from r1_megatron.rl.losses import finalize_metrics
from r1_megatron.rl.mismatch import MaxGap
from r1_megatron.rl.router_replay import routing_metrics
from r1_megatron.train.metrics import MetricsLogger
from r1_megatron.rl.mtp import rl_mtp


def train(cfg: JobConfig, run: session.RunState | None = None) -> dict:
    """Run cfg.rl.steps GRPO steps (resuming from cfg.checkpoint.dir/latest). Returns the last metrics."""
    run = run or session.RunState(cfg)
    trainer, rl = run.trainer, cfg.rl
    train_metrics: dict = {}
    # Collected at each offload: Adam's moments appear only at the first step (offload/).
    offload = TrainerOffload(trainer.model[0], trainer.optimizer, cfg.offload.pin_memory) \
        if cfg.offload.enabled else None
    log, metrics = MetricsLogger(cfg.logging, run.run_dir), {}
    batches = async_rollout.make(run, cfg, offload)  # refit + rollout
    for step in run.progress(range(trainer.step, rl.steps)):
        timer = grpo.PhaseTimer()
        batch, kept, refit = batches.next(step, timer)
        with timer("logprobs"):
            parts, adv_metrics = run.prepare(batch)  # ref (and old) logprobs, advantages, packing
        with timer("train"):
            for _epoch in range(rl.ppo_epochs):
                for mbs, norm in parts:  # rl.num_minibatches optimizer steps
                    # the MTP head per rl.mtp_loss_coef (module doc); the routing context replays (rl.router_replay)
                    gap = MaxGap()
                    mtp = rl_mtp(trainer.unwrapped, rl.mtp_loss_coef, rl.mtp_detach_trunk)
                    with mtp, run.update_routing(mbs) as routing:
                        sums = trainer.train_step(mbs, gap.wrap(grpo.grpo_loss(rl, norm)), entropy=True)
                    train_metrics = {**finalize_metrics(sums), **gap.metrics(), **routing_metrics(routing)}
        metrics = {**grpo.rollout_metrics(batch), **adv_metrics, **kept, **train_metrics, **refit, **timer.metrics(),
                   **async_rollout.staleness_metrics(batch, step)}
        metrics.update(getattr(run.engine, "generate_stats", {}))  # tokens/s, draft acceptance (rank 0's engine)
        if rl.eval_every and (step + 1) % rl.eval_every == 0 and step + 1 < rl.steps:
            batches.wait()  # the engines finish the next batch before the eval uses them
            metrics["eval/accuracy"] = run.evaluate()
        log.log(step + 1, metrics)
        run.show(metrics)
        if cfg.checkpoint.save_every and (step + 1) % cfg.checkpoint.save_every == 0:
            run.save(batches.data_position)
    batches.close()
    run.save(batches.data_position)
    log.close()
    return metrics
