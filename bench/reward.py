"""Reward scoring: pool throughput against the serial baseline, and the share of reward time hidden
behind generation when groups arrive over time. Everything is measured side by side in one run.

    python bench/reward.py [--n 512] [--workers 2] [--group 16] [--math-only]

The batch mixes math responses (right and wrong, boxed, <answer>, decimals vs fractions) and code
responses (fenced python run in the sandbox against stdin/stdout tests). Generation is simulated by
sleeping, as GPU generation leaves the CPU to the scorers. Each group's generation time is --gen-factor
(default 1.5) times the pool's measured scoring time per group: scoring must keep up with the stream for
any overlap to hide it, and on a real run generating 16 long responses takes far longer than scoring
them. On a shared, loaded machine the scoring speed drifts between the phases; the factor's headroom
absorbs that, and the pool's measured speed is printed so the regime is visible.

Lines printed: the three timings, then
    RATIO reward_pool_speedup=<serial time / pool time>
    RATIO reward_overlap_speedup=<sequential stream time / overlapped stream time>
    RATIO reward_overlap_hidden=<share of reward time hidden behind generation>   (goal >= 0.9)
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time

from r1_megatron.config.schema import RewardConfig, SandboxConfig
from r1_megatron.reward import WeightedScorer
from r1_megatron.reward.pool import RewardPool

# task -> (right program, wrong program, (a, b) -> (stdin, expected stdout))
_PROGRAMS = {
    "add": (
        "a, b = map(int, input().split())\nprint(a + b)\n",
        "a, b = map(int, input().split())\nprint(a - b)\n",
        lambda a, b: (f"{a} {b}\n", f"{a + b}\n"),
    ),
    "rev": (
        "print(input()[::-1])\n",
        "print(input())\n",
        lambda a, b: (f"{a}x{b}\n", f"{a}x{b}"[::-1] + "\n"),
    ),
    "max": (
        "print(max(map(int, input().split())))\n",
        "print(0)\n",
        lambda a, b: (f"{a} {b} 7\n", f"{max(a, b, 7)}\n"),
    ),
}


def math_sample(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 50), rng.randint(2, 60)
    truth = rf"\frac{{{a}}}{{{b}}}"
    decimal = f"{a / b:.6f}".rstrip("0")
    wrong = rf"\frac{{{a + 1}}}{{{b}}}"
    shown = rng.choice([rf"\frac{{{a}}}{{{b}}}", f"{a}/{b}", decimal, wrong])
    think = f"<think>We divide {a} by {b} and simplify the fraction.</think> "
    answer = rng.choice([rf"The answer is $\boxed{{{shown}}}$.", f"<answer>{shown}</answer>"])
    return think + answer, truth


def code_sample(rng: random.Random) -> tuple[str, dict]:
    name = rng.choice(sorted(_PROGRAMS))
    right, wrong, make_test = _PROGRAMS[name]
    program = right if rng.random() < 0.7 else wrong
    io = [make_test(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(3)]
    tests = [{"stdin": i, "stdout": o} for i, o in io]
    response = f"<think>Read the input and compute the {name}.</think>\n```python\n{program}```\n"
    return response, {"tests": tests}


def build_batch(n: int, math_only: bool, seed: int = 0) -> list[tuple[str, object]]:
    rng = random.Random(seed)
    return [math_sample(rng) if math_only or i % 2 == 0 else code_sample(rng) for i in range(n)]


def stream(pool: RewardPool, groups: list[list], gen_s: float, overlap: bool) -> float:
    """Wall time to 'generate' every group and have it scored, scoring each group after (sequential)
    or during (overlapped) the generation of the next ones."""
    t0 = time.perf_counter()
    for group in groups:
        time.sleep(gen_s)  # the rollout engine generating this group
        if overlap:
            pool.submit(group)
        else:
            pool.score(group)
    pool.results()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="samples in the batch")
    ap.add_argument("--workers", type=int, default=2, help="scoring processes")
    ap.add_argument("--group", type=int, default=16, help="samples per group (G)")
    ap.add_argument("--gen-factor", type=float, default=1.5, help="generation time / scoring time per group")
    ap.add_argument("--math-only", action="store_true", help="no code samples (if reward/code.py is absent)")
    args = ap.parse_args(argv)
    if not args.math_only and importlib.util.find_spec("r1_megatron.reward.code") is None:
        print("bench/reward.py: r1_megatron.reward.code is missing, so the mixed batch cannot be scored "
              "(run with --math-only)", file=sys.stderr)
        return 1

    weights = {"accuracy": 1.0, "format": 0.1} | ({} if args.math_only else {"code": 1.0})
    cfg = RewardConfig(weights=weights, num_workers=args.workers, timeout_s=30.0, sandbox=SandboxConfig())
    batch = build_batch(args.n, args.math_only)
    groups = [batch[i : i + args.group] for i in range(0, len(batch), args.group)]

    scorer = WeightedScorer(cfg.weights, cfg.language, cfg.sandbox, cfg.code_mode)
    scorer.prepare()
    t0 = time.perf_counter()
    serial = [scorer(r, t) for r, t in batch]
    t_serial = time.perf_counter() - t0

    with RewardPool(cfg) as pool:
        pool.score(batch[: 2 * args.workers])  # workers started and warm
        t0 = time.perf_counter()
        pooled = pool.score(batch)
        t_pool = time.perf_counter() - t0
        mismatched = sum(a.score != b.score or a.error != b.error for a, b in zip(serial, pooled))
        errors = {k: v for k, v in pool.stats(reset=True).items() if k.startswith("reward_error/")}

        gen_s = args.gen_factor * t_pool / len(groups)
        t_seq = stream(pool, groups, gen_s, overlap=False)
        pool.stats(reset=True)
        t_overlap = stream(pool, groups, gen_s, overlap=True)
        hidden = pool.stats()["reward/hidden_frac"]

    mean = sum(r.score for r in pooled) / len(pooled)
    kind = "math" if args.math_only else "math+code"
    print(f"batch: {len(batch)} samples ({kind}), mean reward {mean:.3f}, errors {errors or 'none'}, "
          f"pool/serial mismatches {mismatched}")
    print(f"serial: {t_serial:.2f} s ({len(batch) / t_serial:.1f} samples/s)")
    print(f"pool ({args.workers} workers): {t_pool:.2f} s ({len(batch) / t_pool:.1f} samples/s)")
    print(f"stream of {len(groups)} groups, {gen_s:.3f} s generation each: sequential {t_seq:.2f} s, "
          f"overlapped {t_overlap:.2f} s (generation alone {gen_s * len(groups):.2f} s)")
    print(f"RATIO reward_pool_speedup={t_serial / t_pool:.3f}")
    print(f"RATIO reward_overlap_speedup={t_seq / t_overlap:.3f}")
    print(f"RATIO reward_overlap_hidden={hidden:.3f}")
    return 0 if mismatched == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
