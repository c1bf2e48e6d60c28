"""What `r1m eval` and `r1m rejection` share: both sample an HF checkpoint on vLLM over a prompt file
or a built-in task, report the prompt lines they skipped, and load the tokenizer beside the engine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from r1_megatron.config.schema import RolloutConfig


def add_source_args(p: argparse.ArgumentParser, model_help: str, split: str, n: int) -> None:
    """--model, and the prompts to sample: --prompts FILE or --task NAME with --n."""
    p.add_argument("--model", required=True, help=model_help)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help='JSONL of {"prompt", "answer"} and/or {"prompt", "tests"}')
    src.add_argument("--task", choices=["arithmetic", "countdown"], help=f"a built-in task ({split} split)")
    p.add_argument("--n", type=int, default=n, help=f"prompts drawn from --task (default {n})")


def check_model(parser: argparse.ArgumentParser, model: str) -> None:
    """A usage error unless --model is an HF checkpoint directory."""
    if not (Path(model) / "config.json").is_file():
        parser.error(f"--model {model}: no config.json there (need an HF checkpoint directory)")


def report_inputs(prog: str, items: list[dict], skipped: list[str], source: str | None) -> bool:
    """Print each skipped input line on stderr; False, after saying so, when no prompt is left."""
    for message in skipped:
        print(f"{prog}: skipped {message}", file=sys.stderr)
    if not items:
        print(f"{prog}: no valid prompts in {source}", file=sys.stderr)
    return bool(items)


def open_engine(parser: argparse.ArgumentParser, args: argparse.Namespace, rollout: RolloutConfig) -> tuple[Any, Any]:
    """(tokenizer, vLLM engine) of --model; the tokenizer is --tokenizer's, else the model directory's.
    The caller closes the engine."""
    from r1_megatron.data.tokenizer import load_tokenizer
    from r1_megatron.rollout.vllm_engine import VLLMEngine

    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except FileNotFoundError as e:
        parser.error(f"--tokenizer: {e}")
    return tokenizer, VLLMEngine(args.model, rollout, args.device)
