"""The GRPO loop (DeepSeek-R1 §2.2), on one screen:

  refit the engine from the trainer (canary-checked; the trainer's grads and optimizer state leave
  the device before the engine wakes its weights, its params after the stream, before the KV cache
  wakes: offload/) -> generate G samples per prompt while the reward pool scores finished groups ->
  reload the trainer -> reference logprobs
  (and old ones, unless the training forward gives them: rl.old_logprob_pass) -> group advantages ->
  packed microbatches -> train_step with the GRPO loss -> log, save.

Each phase is a verb of the run object (rl/session.py RunState) and a module of its own: the prompt
stream (rl/prompts.py), rollout (rl/rollout_phase.py), logprobs and packing (rl/prepare.py,
rl/batching.py), the loss and the update (rl/loss.py).

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
from r1_megatron.rl import session


def train(cfg: JobConfig, run: session.RunState | None = None) -> dict:
    """Run cfg.rl.steps GRPO steps (resuming from cfg.checkpoint.dir/latest). Returns the last metrics.
    A run passed in stays open for its caller; one made here is closed here."""
    if run is None:
        run = session.RunState(cfg)
        try:
            return train(cfg, run)
        finally:
            run.close()
    metrics: dict = {}
    run.begin(cfg)  # the trainer offload, the metrics log, the batch source (rl/async_rollout.py)
    try:
        for step in run.steps():
            batch, kept, refit = run.next_batch(step)  # refit + rollout, on policy or one step off
            with run.timer("logprobs"):
                parts, adv_metrics = run.prepare(batch)  # ref (and old) logprobs, advantages, packing
            with run.timer("train"):
                train_metrics = run.train(parts)  # rl.ppo_epochs x rl.num_minibatches optimizer steps
            metrics = run.step_metrics(step, batch, adv_metrics, kept, train_metrics, refit)
            if run.eval_due(step):
                run.wait_rollout()  # the engines finish the next batch before the eval uses them
                metrics["eval/accuracy"] = run.evaluate()
            run.log(step, metrics)
            if run.save_due(step):
                run.save()
    finally:
        run.end()
    run.save()
    return metrics
