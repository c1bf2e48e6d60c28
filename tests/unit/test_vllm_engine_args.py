"""The rollout engine refuses redundant expert slots itself (issue 16, defect 11), without starting vLLM.

config/validate.py refuses rollout.redundant_experts > 0 for a job config; a RolloutConfig built
directly never goes through it. Guarantees:
- argument building (`VLLMEngine._llm_kwargs`, CPU and CUDA) raises a one-line error naming the key,
  and no argument set ever asks vLLM for EPLB;
- the constructor, given such a config, fails at startup with that error before vLLM builds anything.
"""

from __future__ import annotations

import json

import pytest

from r1_megatron.checkpoint.hf_io import hf_config
from r1_megatron.config.loader import load_card
from r1_megatron.config.schema import ConfigError, RolloutConfig
from r1_megatron.rollout.engine import RolloutError
from r1_megatron.rollout.vllm_engine import VLLMEngine

REFUSED = r"^rollout\.redundant_experts\(2\) > 0 needs vLLM's EPLB.*set rollout\.redundant_experts=0$"


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(load_card("tiny_moe"))))
    return tmp_path


def _unstarted(model_dir, cfg: RolloutConfig, device: str) -> VLLMEngine:
    """An engine object with the fields `_llm_kwargs` reads, and no vLLM instance behind it."""
    eng = VLLMEngine.__new__(VLLMEngine)
    eng.model_dir, eng.cfg, eng.device, eng.cpu_custom_ops = model_dir, cfg, device, ["all"]
    eng.dummy_weights, eng.world, eng.routing = False, 1, None
    return eng


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_argument_building_refuses_redundant_rollout_experts(model_dir, device):
    with pytest.raises(ConfigError, match=REFUSED) as err:
        _unstarted(model_dir, RolloutConfig(redundant_experts=2), device)._llm_kwargs()
    assert "\n" not in str(err.value)
    kw = _unstarted(model_dir, RolloutConfig(), device)._llm_kwargs()
    assert not {"enable_eplb", "eplb_config", "enable_expert_parallel"} & set(kw)


def test_engine_built_from_a_direct_rollout_config_fails_at_startup(model_dir):
    with pytest.raises(RolloutError, match="rollout.redundant_experts\\(2\\) > 0") as err:
        VLLMEngine(model_dir, RolloutConfig(redundant_experts=2), device="cpu", dummy_weights=True)
    assert err.value.phase == "startup" and "\n" not in str(err.value)
    assert isinstance(err.value.__cause__, ConfigError)
