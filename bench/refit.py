"""Refit throughput: streaming weights into the vLLM engine against a plain copy of the same bytes.

    python bench/refit.py [--repeats 5] [--bucket-mb 64] [--scale 1]

Two random tiny_moe checkpoints (fp32, MTP layer included, as our export writes them) are held in
memory as (HF name, tensor) streams. Each repeat refits the engine with the other checkpoint (so every
refit really changes the weights), through `Refitter` with `rollout.bucket_mb` buckets, and then copies
the same tensors into preallocated tensors of the same shapes (the floor any in-place refit pays).
Medians are compared, and the refit's split by part is printed (copies, oneDNN handles of the
linears, MoE pre-pack, MLA's derived weights, prefix-cache reset). `--scale K` multiplies the card's
hidden and FFN sizes by K, to see how the engine's fixed per-layer costs amortize over more bytes
(the RATIO line is for the run's shape). After timing, the engine's logprobs are checked against
transformers' for the checkpoint it holds (a fast but wrong refit would not count).

Last line: RATIO refit_vs_copy=<refit bytes/s / plain copy bytes/s>   (goal >= 0.5)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, quiet_vllm  # noqa: E402


def _load(path: Path) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    out: list[tuple[str, torch.Tensor]] = []
    for f in sorted(path.glob("*.safetensors")):
        out += sorted(load_file(f).items())
    return out


def _plain_copy(stream: list[tuple[str, torch.Tensor]], dst: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    for name, t in stream:
        dst[name].copy_(t)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bucket-mb", type=float, default=None, help="default: rollout.bucket_mb")
    p.add_argument("--scale", type=int, default=1, help="multiply hidden and FFN sizes of tiny_moe")
    args = p.parse_args(argv)

    quiet_vllm()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from r1_megatron.config.loader import load_card
    from r1_megatron.config.schema import RolloutConfig
    from r1_megatron.model.random_hf import make_hf_checkpoint
    from r1_megatron.rollout.refit import Refitter, canary_sequences
    from r1_megatron.rollout.vllm_engine import VLLMEngine

    hf_logging.set_verbosity_error()  # the MTP layer's tensors are unknown to transformers' model
    card, cfg = load_card("tiny_moe"), RolloutConfig()
    k = args.scale
    card = replace(card, hidden_size=card.hidden_size * k, ffn_hidden_size=card.ffn_hidden_size * k,
                   moe_ffn_hidden_size=card.moe_ffn_hidden_size * k)
    bucket_mb = args.bucket_mb if args.bucket_mb is not None else cfg.bucket_mb
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [Path(tmp) / "A", Path(tmp) / "B"]
        for seed, d in enumerate(dirs):
            make_hf_checkpoint(card, d, seed=seed)
        streams = [_load(d) for d in dirs]
        nbytes = sum(t.numel() * t.element_size() for _, t in streams[0])
        dst = {name: torch.zeros_like(t) for name, t in streams[0]}  # zeros: pages touched before timing
        engine = VLLMEngine(dirs[0], cfg)
        try:
            refitter = Refitter(engine, bucket_mb=bucket_mb)
            refitter.refit(iter(streams[1]))  # warm-up, not timed
            _plain_copy(streams[1], dst)
            refit_bps, copy_bps, splits = [], [], []
            for r in range(args.repeats):
                which = r % 2  # the engine holds B after the warm-up: A, B, A, ...
                report = refitter.refit(iter(streams[which]))
                copy_s = _plain_copy(streams[which], dst)
                refit_bps.append(report["bytes"] / report["seconds"])
                copy_bps.append(nbytes / copy_s)
                splits.append(report["split"] | {"plain copy": copy_s})
                print(f"repeat {r}: refit v{report['version']} {report['bytes'] / 2**20:.1f} MiB in "
                      f"{report['buckets']} buckets {report['seconds'] * 1e3:.1f} ms; "
                      f"plain copy {copy_s * 1e3:.1f} ms")
            held = dirs[(args.repeats - 1) % 2]
            tokens = canary_sequences(card.vocab_size, 64)
            model = AutoModelForCausalLM.from_pretrained(held, dtype=torch.float32).eval()
            ids = torch.tensor(tokens)
            with torch.no_grad():
                ref = model(ids).logits[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None])[..., 0]
            err = max(float((g - w).abs().max()) for g, w in zip(engine.logprobs(tokens), ref, strict=True))
        finally:
            engine.close()
    print(f"check: engine logprobs after the last refit vs transformers on {held.name}, max |diff| {err:.2e}")
    if err > 1e-3:
        print("the refit left the engine wrong: not reporting its speed", file=sys.stderr)
        return 1
    refit_rate, copy_rate = statistics.median(refit_bps), statistics.median(copy_bps)
    print(f"tiny_moe x{args.scale} fp32, {nbytes / 2**20:.1f} MiB, bucket {bucket_mb} MiB; torch threads "
          f"{torch.get_num_threads()}; {load_average()}")
    print(f"median refit {refit_rate / 2**20:,.0f} MiB/s, plain copy {copy_rate / 2**20:,.0f} MiB/s")
    # Where a refit goes (engine.refit_split), each part's median; only "copy" moves bytes as the plain
    # copy does, the rest rewrites them into the layouts vLLM-CPU's kernels read, or resets the cache.
    parts = ", ".join(f"{k} {statistics.median(s[k] for s in splits) * 1e3:.1f} ms" for k in splits[0])
    print(f"median split of a refit: {parts}")
    print(f"RATIO refit_vs_copy={refit_rate / copy_rate:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
