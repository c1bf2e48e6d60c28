"""`r1m score`: per-token log-probs of token ids under a checkpoint (megatron or HF directory).

  r1m score --ckpt DIR --input IN.jsonl --output OUT.jsonl [--tp N --pp N --ep N]

With --tp/--pp/--ep (under torchrun) the megatron checkpoint is loaded split that way and scored by the
trainer's pipeline-aware forward (train/trainer.py forward_logprobs); rank 0 writes the output.

Each input line is a JSON object with "tokens": [int, ...] (at least 2). The output line is the input
object plus "logprobs": log p(tokens[t] | tokens[:t]) for t = 1..n-1, computed in fp32 by the
megatron model (main model only, no MTP). No tokenizer is needed. An HF directory may be the FP8
blockwise DeepSeek format (dequantized on load); files are checked against the directory's
r1m_manifest.json first (--verify full|size|off).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from r1_megatron.checkpoint.hf import ConversionError
from r1_megatron.checkpoint.integrity import CheckpointError


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


def score_file(
    ckpt: str | Path, input_path: str | Path, output_path: str | Path, verify: str = "full"
) -> int:
    """Score every line; returns the number of lines written."""
    from r1_megatron.train.convert_job import load_any

    model, cfg = load_any(ckpt, verify=verify)
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


def score_file_parallel(
    ckpt: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    layout: tuple[int, int, int],
    verify: str = "full",
) -> int:
    """score_file on every rank of a torchrun job, the model split as (tp, pp, ep); rank 0 writes."""
    import torch.distributed as dist

    from r1_megatron.checkpoint import mcore_io
    from r1_megatron.train.forward import ForwardModel
    from r1_megatron.train.microbatch import Microbatch

    if not mcore_io.is_mcore_dir(ckpt):
        raise ConversionError(f"{ckpt}: --tp/--pp/--ep need a megatron checkpoint ({mcore_io.CARD_FILE})")
    vocab = mcore_io.read_card(ckpt).vocab_size
    requests = list(read_requests(input_path, vocab))  # every line checked before any collective
    tp, pp, ep = layout
    try:
        trainer = ForwardModel.open(ckpt, tp=tp, pp=pp, ep=ep, verify=verify).trainer
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    mbs = []
    for obj in requests:
        ids = torch.tensor([obj["tokens"]], dtype=torch.long)
        labels = torch.roll(ids, -1, dims=1)
        mbs.append(Microbatch(ids, labels, torch.ones_like(ids, dtype=torch.float32),
                              torch.arange(ids.shape[1]).unsqueeze(0)))
    logprobs = trainer.forward_logprobs(mbs) if mbs else []
    if dist.get_rank() == 0:
        out = Path(output_path)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "w") as f:
            for obj, lp in zip(requests, logprobs, strict=True):
                obj["logprobs"] = lp[0, :-1].tolist()
                f.write(json.dumps(obj) + "\n")
        tmp.replace(out)
    dist.barrier()
    return len(requests)
