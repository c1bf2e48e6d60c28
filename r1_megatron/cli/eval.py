"""`r1m eval`: pass@1 / cons@k of an HF checkpoint on a prompt file or a built-in task.

    r1m eval --model HF_DIR --prompts FILE.jsonl [--k 4] [--temperature 0.6] [--top-p 0.95]
             [--max-tokens 512] [--out report.json]
    r1m eval --model HF_DIR --task arithmetic --n 64 [--template compact] [--seed 0]

A prompt file holds math prompts {"prompt", "answer"} and code tasks {"prompt", "tests"}, mixed freely;
a bad line is reported as FILE:LINE: reason on stderr (and in the report's "input_errors") and the good
lines still run. Built-in tasks draw from the held-out eval split. The tokenizer is read from the model
directory unless --tokenizer names another. Sampling runs on vLLM (rollout/vllm_engine.py).

Exit status: 0 when a report was written, 1 when no prompt could be read, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from r1_megatron.cli.sampling import add_source_args, check_model, open_engine, report_inputs
from r1_megatron.config.schema import RewardConfig, RolloutConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1m eval", description="pass@1 / cons@k of a checkpoint")
    add_source_args(p, "HF checkpoint directory (config.json + safetensors)", "eval", 64)
    p.add_argument("--template", default="compact", help="prompt template of --task (default compact)")
    p.add_argument("--seed", type=int, default=0, help="task draw and sampling seed (default 0)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (default 0.95)")
    p.add_argument("--max-tokens", type=int, default=512, help="response length cap (default 512)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--no-text", action="store_true", help="leave the response texts out of the report")
    p.add_argument("--workers", type=int, default=2, help="reward scoring processes (default 2)")
    p.add_argument("--timeout", type=float, default=10.0, help="per-sample reward timeout, s (default 10)")
    p.add_argument("--max-model-len", type=int, default=0, help="vLLM max sequence length (0: the model's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="vLLM device")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag, value, low in (("--k", args.k, 1), ("--n", args.n, 1), ("--max-tokens", args.max_tokens, 1),
                             ("--workers", args.workers, 1)):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.timeout <= 0:
        p.error(f"need --temperature >= 0, 0 < --top-p <= 1, --timeout > 0; got {args.temperature}, "
                f"{args.top_p}, {args.timeout}")
    check_model(p, args.model)
    if args.prompts and not Path(args.prompts).is_file():
        p.error(f"--prompts {args.prompts}: no such file")


def load_items(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """The eval items and the bad-line messages of the prompt file (none for a built-in task)."""
    if args.prompts:
        from r1_megatron.eval.scoring import read_prompt_file

        items, errors = read_prompt_file(args.prompts)
        return items, [str(e) for e in errors]
    from r1_megatron.data.tasks import make_items

    return make_items(args.task, args.n, seed=args.seed, split="eval", template=args.template), []


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        items, input_errors = load_items(args)
    except ValueError as e:
        parser.error(str(e))
    if not report_inputs("r1m eval", items, input_errors, args.prompts):
        return 1

    from r1_megatron.eval.runner import eval_sampling, evaluate, format_table

    rollout = RolloutConfig(seed=args.seed, max_model_len=args.max_model_len)
    tokenizer, engine = open_engine(parser, args, rollout)
    sampling = eval_sampling(args.max_tokens, args.temperature, args.top_p, args.seed)
    try:
        report = evaluate(engine, tokenizer, items, k=args.k, sampling=sampling, chat=args.chat,
                          keep_text=not args.no_text,
                          reward_cfg=RewardConfig(num_workers=args.workers, timeout_s=args.timeout))
    finally:
        engine.close()
    report = {"model": str(args.model), "source": args.prompts or f"task:{args.task}",
              "input_errors": input_errors, **report}
    print(format_table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"report written to {args.out}")
    return 0
