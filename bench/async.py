"""One-step-off-policy rollout against on-policy rollout, with separate engines, on the same work.

Runs our loop twice on tiny_moe with `rollout.placement=separate` (one engine process beside the
trainer): `rollout.async=off` (refit, generate, then train) and `rollout.async=one_step` (generation
of step k+1 runs in the engine process while the trainer trains step k). Both use rl.tis=2 and the
same prompts, shapes and seeds; each times 1 warm-up step plus --steps steps, from the per-phase
times the loop logs (time/step: the trainer's wall time per step; in async mode what generation did
not hide shows as time/rollout_wait).

    python bench/async.py [--steps 4] [key=value ...]   (overrides of both runs' config)

The overlap is bounded by the cores: with 2 cores, the engine and the trainer each get about one
while both run, so async can at best hide the shorter of (rollout, train) behind the other, and
only if the two do not slow each other down. Other processes on the machine take from the same cores.

Last line: RATIO async_vs_sync=<sync s/step / async s/step>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BenchRun, load_average, make_hf_dir, mean, our_config, phase_times, quiet_vllm  # noqa: E402


def run_mode(tmp: Path, hf_dir: Path, mode: str, steps: int, overrides: list[str]) -> list[dict[str, float]]:
    from r1_megatron.rl import loop

    run_dir = tmp / mode
    cfg = our_config(run_dir, hf_dir, steps=1 + steps, extra=(
        "rollout.placement=separate", "rollout.engines=1", f"rollout.async={mode}", "rl.tis=2.0", *overrides))
    run = BenchRun(cfg)
    try:
        loop.train(cfg, run=run)
    finally:
        run.close()
    return phase_times(run_dir, skip=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode (after 1 warm-up step)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of both runs' config")
    args = parser.parse_args(argv)
    quiet_vllm()
    per_step = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_hf_dir(Path(tmp) / "hf")
        for mode in ("off", "one_step"):
            print(f"{mode}: before: {load_average()}", flush=True)
            steps = run_mode(Path(tmp), hf_dir, mode, args.steps, args.overrides)
            per_step[mode] = mean([s["step"] for s in steps])
            phases = sorted({k for s in steps for k in s} - {"step"})
            split = ", ".join(f"{p} {mean([s.get(p, 0.0) for s in steps]):.2f}" for p in phases)
            print(f"{mode}: {per_step[mode]:.3f} s/step ({split}); after: {load_average()}", flush=True)
    print(f"RATIO async_vs_sync={per_step['off'] / per_step['one_step']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
