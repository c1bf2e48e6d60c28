"""Step metrics: one JSON line per step (metrics.jsonl), TensorBoard scalars, wandb when configured,
and a reward/accuracy curve PNG. Only rank 0 writes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from r1_megatron.config.schema import LoggingConfig


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


class MetricsLogger:
    """Appends `{"step": i, ...}` lines to <run_dir>/metrics.jsonl and mirrors scalars to TB/wandb."""

    def __init__(self, cfg: LoggingConfig, run_dir: str | Path, config_dict: dict | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = is_rank0()
        self._tb = self._wandb = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if cfg.wandb_project:
            import wandb  # optional: only imported when configured

            self._wandb = wandb.init(project=cfg.wandb_project, dir=str(self.run_dir), config=config_dict)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(row, default=float) + "\n")
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curve(rows: list[dict], out: str | Path, keys: tuple[str, ...] = ("reward/mean", "accuracy"),
               title: str = "GRPO") -> Path:
    """Plot the named metrics against step (plus held-out accuracy points if present) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key)
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    if evals:
        ax.plot(*zip(*evals), "o--", label="held-out accuracy")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
