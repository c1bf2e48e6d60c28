"""`r1m demo [--out DIR] [seed=N] [sft_steps=N] [sft_lr=X] [key=value ...]`: the tiny CPU GRPO demo
(SFT base, GRPO, eval, curve); demo.py says what it shows.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from r1_megatron.config import load_config, save_resolved
from r1_megatron.config.loader import CONFIGS_DIR
from r1_megatron.demo import sft_base


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print("usage: " + __doc__.split("`")[1] + "\n\n" + __doc__.split(": ", 1)[1].strip())
        return 0
    out = Path("runs/demo")
    if "--out" in argv:
        i = argv.index("--out")
        out, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2 :]
    sft_steps, sft_lr = 400, 2e-3
    rest = []
    for a in argv:
        if a.startswith("sft_steps="):
            sft_steps = int(a.split("=", 1)[1])
        elif a.startswith("sft_lr="):
            sft_lr = float(a.split("=", 1)[1])
        else:
            rest.append(a)
    overrides = [f"logging.run_dir={out}", *[("seed=" + a[5:]) if a.startswith("seed=") else a for a in rest]]
    cfg = load_config(CONFIGS_DIR / "demo_cpu.yaml", overrides)
    save_resolved(cfg, out)
    start = time.time()
    # The SFT base trains at its own (higher) learning rate with warmup and cosine decay; GRPO uses
    # optim from the config.
    sft_optim = dataclasses.replace(cfg.optim, lr=sft_lr, warmup_steps=min(20, sft_steps // 10),
                                    decay_style="cosine", total_steps=sft_steps)
    sft_cfg = dataclasses.replace(cfg, optim=sft_optim)
    base_root = sft_base(sft_cfg, out, sft_steps)
    from r1_megatron.rl import loop
    from r1_megatron.rl.session import RunState
    from r1_megatron.train.metrics import is_rank0, plot_curve, read_metrics
    from r1_megatron.train.weights import export_hf

    rl_cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=str(base_root)))
    run = RunState(rl_cfg)
    base_file = out / "base_accuracy.json"
    if run.trainer.step == 0:
        base_acc = run.evaluate()
        if is_rank0():
            base_file.write_text(json.dumps({"base_accuracy": base_acc}))
    elif base_file.is_file():  # resumed mid-GRPO: the policy is no longer the base; use what it scored
        base_acc = json.loads(base_file.read_text())["base_accuracy"]
    else:
        run.close()
        raise SystemExit(f"r1m demo: {out} holds a GRPO run at step {run.trainer.step} but not the base's "
                         f"accuracy ({base_file.name}); use another --out or remove {out}")
    if is_rank0():
        print(f"base held-out accuracy (pass@1, 4 samples): {base_acc:.3f}", flush=True)
    loop.train(rl_cfg, run=run)
    final_acc = run.evaluate()
    export_hf(run.trainer, out / "hf", run._tokenizer_dir())  # collective; rank 0 writes
    if not is_rank0():
        run.close()
        return 0
    rows = read_metrics(out / "metrics.jsonl")
    rows.insert(0, {"step": 0, "eval/accuracy": base_acc})
    rows.append({"step": cfg.rl.steps, "eval/accuracy": final_acc})
    plot_curve(rows, out / "curve.png", title="r1m demo: GRPO on tiny_moe (CPU)")
    summary = {"base_accuracy": base_acc, "final_accuracy": final_acc, "steps": cfg.rl.steps,
               "sft_steps": sft_steps, "sft_lr": sft_lr, "seconds": round(time.time() - start, 1), "run_dir": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"held-out accuracy: base {base_acc:.3f} -> after GRPO {final_acc:.3f} "
          f"({cfg.rl.steps} steps, {summary['seconds']:.0f} s); run dir {out}", flush=True)
    run.close()
    return 0
