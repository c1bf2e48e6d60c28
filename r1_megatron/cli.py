"""`r1m` entry point. Each subcommand lives in its own module and is imported only when used,
so `r1m reward ...` does not pay for importing megatron-core or vLLM.

Every subcommand also runs as `python -m r1_megatron.cli <subcommand> ...` (for torchrun).
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("r1_megatron.demo", "main", "the tiny CPU GRPO demo (SFT base, GRPO, eval, curve)"),
    "train": ("r1_megatron.rl.loop", "main", "GRPO training from a job config (torchrun-able)"),
    "sft": ("r1_megatron.rl.cli", "sft_main", "SFT on a JSONL of prompt/response pairs (torchrun-able)"),
    "score": ("r1_megatron.train.score_job", "main", "per-token logprobs of token ids under a checkpoint"),
    "convert": ("r1_megatron.train.convert_job", "main", "hf-to-mcore / mcore-to-hf checkpoint conversion"),
    "reward": ("r1_megatron.reward.cli", "main", "score one response (math) or program (code)"),
    "eplb": ("r1_megatron.rollout.eplb_cli", "main", "plan redundant-expert placement from loads"),
    "pipeline": ("r1_megatron.pipeline.run", "main", "run a multi-stage R1 recipe config"),
    "eval": ("r1_megatron.eval.cli", "main", "pass@1 / cons@k of a checkpoint on a prompt set"),
    "rejection": ("r1_megatron.distill.rejection", "main", "rejection-sample a checkpoint into an SFT JSONL"),
    "plan": ("r1_megatron.plan.cli", "main", "memory/communication plan for a config and layout"),
    "doctor": ("r1_megatron.plan.doctor", "main", "report which GPU-path components are available"),
    "validate": ("r1_megatron.config.cli", "main", "load and check a job config, print the resolved result"),
}


def usage() -> str:
    lines = ["usage: r1m <command> [args...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"r1m: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    from r1_megatron.checkpoint.integrity import CheckpointError
    from r1_megatron.config.loader import ConfigError

    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except ConfigError as e:  # one line naming the key beats a traceback through the loader
        print(f"r1m {name}: config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # likewise one line naming the file (a corrupt shard, a bad layout)
        print(f"r1m {name}: checkpoint error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not getattr(e, "one_line", False):  # errors whose message says everything (NonFiniteError)
            raise
        print(f"r1m {name}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
