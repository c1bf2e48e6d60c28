"""`r1m rejection`: rejection-sample a checkpoint into an SFT JSONL (the sampling and the filter are
distill/rejection.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from r1_megatron.cli.sampling import add_source_args, check_model, open_engine, report_inputs
from r1_megatron.config.schema import RolloutConfig
from r1_megatron.data.jsonl import write_jsonl
from r1_megatron.distill.rejection import RejectionConfig, rejection_sample
from r1_megatron.rollout.engine import SamplingParams

_USAGE = """\
rejection sampling into an SFT JSONL:
  r1m rejection --model HF_DIR (--prompts FILE | --task NAME --n N) --out sft.jsonl
      [--k 4] [--temperature 0.6] [--top-p 0.95] [--max-tokens 512] [--min-tokens 1] [--max-response-tokens N]
      [--language en] [--min-language 1.0] [--non-reasoning-fraction 0.25] [--non-reasoning FILE]
      [--eval-prompts FILE | --eval-task NAME --eval-n N] [--report report.json]
Bad prompt-file lines are reported as FILE:LINE: reason and skipped; exit status 0 when the set was
written, 1 when nothing could be sampled, 2 for bad arguments."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="r1m rejection", description=_USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p, "HF checkpoint directory of the policy to sample", "train", 256)
    p.add_argument("--template", default="compact", help="prompt template of built-in tasks and chitchat")
    p.add_argument("--out", required=True, help="the SFT JSONL to write")
    p.add_argument("--report", help="write the counts as JSON here")
    p.add_argument("--k", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=512, help="sampling cap; capped samples are dropped")
    p.add_argument("--min-tokens", type=int, default=1)
    p.add_argument("--max-response-tokens", type=int, default=0, help="longest response kept (0: the cap)")
    p.add_argument("--language", default="en", help="target language of the chain of thought")
    p.add_argument("--min-language", type=float, default=1.0, help="least target-script word share")
    p.add_argument("--max-per-prompt", type=int, default=0, help="most samples kept per prompt (0: all)")
    p.add_argument("--no-dedupe", action="store_true", help="keep identical responses to one prompt")
    p.add_argument("--non-reasoning-fraction", type=float, default=0.0, help="share of non-reasoning pairs")
    p.add_argument("--non-reasoning", help='SFT JSONL {"prompt", "response"} (default: built-in chitchat)')
    ev = p.add_mutually_exclusive_group()
    ev.add_argument("--eval-prompts", help="JSONL eval prompts to decontaminate against")
    ev.add_argument("--eval-task", choices=["arithmetic", "countdown"],
                    help="decontaminate against a task's eval questions (countdown vs countdown drops all)")
    p.add_argument("--eval-n", type=int, default=64, help="eval prompts of --eval-task (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p


def _read_inputs(args: argparse.Namespace) -> tuple[list[dict], list[str], list[str] | None, list[dict]]:
    """(prompt items, bad-line messages, eval texts or None, non-reasoning pairs); a ValueError names
    the file."""
    from r1_megatron.data.jsonl import read_jsonl
    from r1_megatron.data.tasks import chitchat_pairs, make_items
    from r1_megatron.eval.scoring import read_prompt_file

    for flag, path in (("--prompts", args.prompts), ("--eval-prompts", args.eval_prompts),
                       ("--non-reasoning", args.non_reasoning)):
        if path and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")
    bad: list[str] = []
    if args.prompts:
        items, errors = read_prompt_file(args.prompts)
        bad += [str(e) for e in errors]
    else:
        items = make_items(args.task, args.n, seed=args.seed, split="train", template=args.template)
    eval_texts = None
    if args.eval_prompts:
        eval_items, errors = read_prompt_file(args.eval_prompts)
        bad += [str(e) for e in errors]
        eval_texts = [e.get("question") or e["prompt"] for e in eval_items]
    elif args.eval_task:
        eval_items = make_items(args.eval_task, args.eval_n, seed=args.seed, split="eval")
        eval_texts = [e["question"] for e in eval_items]
    if args.non_reasoning:
        pairs, errors = read_jsonl(args.non_reasoning, "sft")
        bad += [str(e) for e in errors]
    else:
        pairs = chitchat_pairs(16, seed=args.seed, template=args.template)
    return items, bad, eval_texts, pairs
def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    check_model(parser, args.model)
    try:
        cfg = RejectionConfig(
            k=args.k, min_tokens=args.min_tokens, max_tokens=args.max_response_tokens, language=args.language,
            min_language=args.min_language, dedupe=not args.no_dedupe, max_per_prompt=args.max_per_prompt,
            non_reasoning_fraction=args.non_reasoning_fraction, seed=args.seed)
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                                  seed=args.seed)
        items, bad, eval_texts, pairs = _read_inputs(args)
    except ValueError as e:
        parser.error(str(e))
    if not report_inputs("r1m rejection", items, bad, args.prompts):
        return 1
    tokenizer, engine = open_engine(parser, args, RolloutConfig(seed=args.seed))
    try:
        records, report = rejection_sample(engine, tokenizer, items, cfg, sampling, eval_texts=eval_texts,
                                           non_reasoning=pairs, chat=args.chat)
    except ValueError as e:
        print(f"r1m rejection: {e}", file=sys.stderr)
        return 1
    finally:
        engine.close()
    for record in records:
        record.setdefault("model", str(args.model))
    write_jsonl(args.out, records)
    report = {"model": str(args.model), "input_errors": bad, **report}
    print(json.dumps({k: v for k, v in report.items() if k != "input_errors"}))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0
