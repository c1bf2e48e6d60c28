"""`r1m score`: per-token log-probs of token ids under a checkpoint (megatron or HF directory).

  r1m score --ckpt DIR --input IN.jsonl --output OUT.jsonl

Each input line is a JSON object with "tokens": [int, ...] (at least 2). The output line is the input
object plus "logprobs": log p(tokens[t] | tokens[:t]) for t = 1..n-1, computed in fp32 by the
megatron model (main model only, no MTP). No tokenizer is needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from r1_megatron.checkpoint.hf import ConversionError


class ScoreInputError(ValueError):
    """A bad input line, named by file and line number."""


def read_requests(path: str | Path, vocab_size: int) -> Iterator[dict]:
    """Parse and check the input JSONL lazily; blank lines are skipped."""
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScoreInputError(f"{where}: not valid JSON ({e.msg})") from e
            tokens = obj.get("tokens") if isinstance(obj, dict) else None
            if not isinstance(tokens, list) or len(tokens) < 2:
                raise ScoreInputError(f"{where}: 'tokens' must be a list of at least 2 token ids")
            for t in tokens:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                    raise ScoreInputError(f"{where}: token {t!r} is not an id in [0, {vocab_size})")
            yield obj


@torch.no_grad()
def token_logprobs(model: torch.nn.Module, tokens: list[int], device: torch.device) -> list[float]:
    """log p(tokens[t] | tokens[:t]) for t >= 1, fp32."""
    from r1_megatron.model.provider import forward_logits

    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    logits = forward_logits(model, ids).float()
    logp = torch.log_softmax(logits[0, :-1], dim=-1)
    return logp.gather(1, ids[0, 1:, None]).squeeze(1).tolist()


def score_file(ckpt: str | Path, input_path: str | Path, output_path: str | Path) -> int:
    """Score every line; returns the number of lines written."""
    from r1_megatron.checkpoint.convert import load_any

    model, cfg = load_any(ckpt)
    model.eval()
    device = next(model.parameters()).device
    requests = list(read_requests(input_path, cfg.vocab_size))  # every line checked before any work
    out = Path(output_path)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        for obj in requests:
            obj["logprobs"] = token_logprobs(model, obj["tokens"], device)
            f.write(json.dumps(obj) + "\n")
    tmp.replace(out)
    return len(requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1m score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="megatron checkpoint (r1m) or HF directory")
    parser.add_argument("--input", required=True, help='JSONL, one {"tokens": [...]} per line')
    parser.add_argument("--output", required=True, help="JSONL with 'logprobs' added")
    args = parser.parse_args(argv)
    try:
        n = score_file(args.ckpt, args.input, args.output)
    except (ScoreInputError, ConversionError, FileNotFoundError) as e:
        print(f"r1m score: {e}", file=sys.stderr)
        return 1
    print(f"scored {n} sequences -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
