"""`r1m demo [--out DIR] [seed=N] [sft_steps=N] [sft_lr=X] [key=value ...]`: the tiny CPU GRPO demo:
configs/demo_pipeline.yaml (a weak SFT base, then GRPO with held-out pass@1 before and after; that
file says what it shows) run as a pipeline into DIR (default runs/demo), then DIR/curve.png and
DIR/summary.json.

sft_steps=N and sft_lr=X set the SFT base's steps (warmup min(20, N // 10), cosine decay over N steps)
and learning rate; every other key=value reaches every stage's job config, as in `r1m pipeline`. A
rerun into the same DIR skips the finished SFT base and resumes GRPO (with more rl.steps, say); one
that changes anything but steps, reporting or layout is refused with the keys and both values.

Runs the same under torchrun at any layout (`torchrun --nproc-per-node 4 -m r1_megatron.cli demo
parallel.tp=2 parallel.ep=2`): every rank runs both stages, each a colocated vLLM rank in GRPO; rank
0 prints and writes the files.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from r1_megatron.config.loader import CONFIGS_DIR, ConfigError

PIPELINE = CONFIGS_DIR / "demo_pipeline.yaml"
SFT, GRPO = "sft_base", "grpo"  # its stages


def pipeline_overrides(argv: list[str]) -> list[str]:
    """The demo's arguments as `r1m pipeline` overrides: sft_steps= and sft_lr= on stage sft_base."""
    out = []
    for arg in argv:
        key, _, value = arg.partition("=")
        try:
            if key == "sft_steps":
                n = int(value)
                optim = f"stages.{SFT}.overrides.optim"
                out += [f"stages.{SFT}.steps={n}", f"{optim}.warmup_steps={min(20, n // 10)}",
                        f"{optim}.total_steps={n}"]
            elif key == "sft_lr":
                out.append(f"stages.{SFT}.overrides.optim.lr={float(value)!r}")
            else:
                out.append(arg)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print("usage: " + __doc__.split("`")[1] + "\n\n" + __doc__.split(": ", 1)[1].strip())
        return 0
    out = Path("runs/demo")
    if "--out" in argv:
        i = argv.index("--out")
        if i + 1 >= len(argv):
            print("r1m demo: --out needs a directory", file=sys.stderr)
            return 2
        out, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2 :]
    from r1_megatron.pipeline.run import is_writer, run
    from r1_megatron.pipeline.spec import load_pipeline

    start = time.time()
    pipeline = load_pipeline(PIPELINE, pipeline_overrides(argv))
    report = run(pipeline, out)
    if is_writer():
        sft, grpo = (next(s for s in pipeline.stages if s.spec.name == name) for name in (SFT, GRPO))
        record = next(r for r in report["stages"] if r["name"] == GRPO)
        summary = {"base_accuracy": record["base_accuracy"], "final_accuracy": record["final_accuracy"],
                   "steps": grpo.job.rl.steps, "sft_steps": sft.spec.steps, "sft_lr": sft.job.optim.lr,
                   "seconds": round(time.time() - start, 1), "run_dir": str(out)}
        finish(out, summary)
    return 0


def finish(out: Path, summary: dict) -> None:
    """curve.png (GRPO's metrics with the base's and the final accuracy at both ends) and summary.json."""
    from r1_megatron.train.metrics import plot_curve, read_metrics

    rows = read_metrics(out / "metrics.jsonl")
    rows.insert(0, {"step": 0, "eval/accuracy": summary["base_accuracy"]})
    rows.append({"step": summary["steps"], "eval/accuracy": summary["final_accuracy"]})
    plot_curve(rows, out / "curve.png", title="r1m demo: GRPO on tiny_moe (CPU)")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"held-out accuracy: base {summary['base_accuracy']:.3f} -> after GRPO "
          f"{summary['final_accuracy']:.3f} ({summary['steps']} steps, {summary['seconds']:.0f} s); "
          f"run dir {out}", flush=True)
