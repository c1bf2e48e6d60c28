"""rollout.speculative and rl.mtp_* keys (defaults off, one-line errors naming key and numbers), the
vLLM speculative config they give, which checkpoint tensors the drafter owns, and how a step's
acceptance figures come out of vLLM's running totals."""

import pytest

from r1_megatron.config import ConfigError, load_config, validate
from r1_megatron.rollout.speculative import SpecCounts, drafter_weight_filter, vllm_config


def _cfg(*overrides: str, card: str = "tiny_moe"):
    cfg = load_config(None, [f"model.card={card}", *overrides])
    validate(cfg)
    return cfg


def test_defaults_are_todays_behaviour():
    cfg = _cfg()
    assert cfg.rollout.speculative.method == "none"
    assert cfg.rl.mtp_loss_coef == 0.0 and cfg.rl.mtp_detach_trunk is True


def test_speculative_keys_and_vllm_config():
    cfg = _cfg("rollout.speculative.method=mtp", "rollout.speculative.num_speculative_tokens=2")
    assert vllm_config(cfg.rollout.speculative) == {"method": "mtp", "num_speculative_tokens": 2}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.speculative.method=mtp", "model.mtp_num_layers=0"],
         "rollout.speculative.method(mtp) needs an MTP head, but model.mtp_num_layers is 0"),
        (["rollout.speculative.num_speculative_tokens=0"],
         "rollout.speculative.num_speculative_tokens(0) must be >= 1"),
        (["rl.mtp_loss_coef=-0.1"], "rl.mtp_loss_coef(-0.1) must be >= 0"),
        (["rl.mtp_loss_coef=0.3", "model.mtp_num_layers=0"], "model.mtp_num_layers (0) > 0"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        _cfg(*overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="rollout.speculative.method"):
        _cfg("rollout.speculative.method=eagle")


def test_drafter_owns_the_mtp_layer_but_not_its_shared_copies():
    names = {"model.embed_tokens.weight", "lm_head.weight", "model.layers.2.mlp.gate.weight",
             "model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight",
             "model.layers.3.self_attn.kv_b_proj.weight", "model.layers.3.embed_tokens.weight",
             "model.layers.3.shared_head.head.weight", "model.layers.3.shared_head.norm.weight"}
    owned = sorted(n for n in names if drafter_weight_filter(names)(n))
    assert owned == ["model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight",
                     "model.layers.3.self_attn.kv_b_proj.weight", "model.layers.3.shared_head.norm.weight"]
    assert not any(drafter_weight_filter({"model.layers.0.mlp.gate.weight"})(n) for n in names)


def test_step_figures_are_differences_of_running_totals():
    before = SpecCounts(drafts=10, draft_tokens=20, accepted_tokens=5, per_pos=[4, 1])
    after = SpecCounts(drafts=30, draft_tokens=60, accepted_tokens=25, per_pos=[16, 9])
    step = after.minus(before).metrics()
    assert step == {"rollout/spec_acceptance": 0.5, "rollout/spec_accepted_per_step": 1.0,
                    "rollout/spec_draft_tokens": 40.0, "rollout/spec_acceptance_pos0": 0.6,
                    "rollout/spec_acceptance_pos1": 0.4}
    assert SpecCounts().metrics() == {}  # no drafts (speculation off or nothing decoded): no figures
