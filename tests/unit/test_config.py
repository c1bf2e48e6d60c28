"""The config is strict: unknown keys, wrong types, non-dividing layouts and missing cards are
one-line errors naming the key (and the numbers); overrides and the resolved config round-trip.
Defaults that an issue fixed are pinned (the sandbox's process limit, 16)."""

import pytest

from r1_megatron.config import ConfigError, config_from_resolved, load_config, save_resolved, validate
from r1_megatron.config.loader import MODELS_DIR
from r1_megatron.config.schema import SandboxConfig


def _err(*overrides: str, world_size: int | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        cfg = load_config(None, ["model.card=micro_moe", *overrides])
        validate(cfg, world_size)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_every_card_loads():
    cards = sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))
    assert {"deepseek_v3_671b", "tiny_moe", "micro_moe", "qwen2_tiny"} <= set(cards)
    for card in cards:
        cfg = load_config(None, [f"model.card={card}"])
        assert cfg.model.card == card


def test_card_values_and_overrides():
    cfg = load_config(None, ["model.card=deepseek_v3_671b", "rl.group_size=16", "optim.lr=3e-6"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_experts) == (7168, 61, 256)
    assert cfg.rl.group_size == 16 and cfg.optim.lr == 3e-6
    cfg = load_config(None, ["model.card=micro_moe", "model.num_layers=4"])
    assert cfg.model.num_layers == 4  # job fields win over the card


def test_unknown_key_suggests():
    msg = _err("parallel.tpp=2")
    assert "parallel.tpp" in msg and "did you mean 'parallel.tp'" in msg
    msg = _err("rl.grop_size=4")
    assert "rl.grop_size" in msg and "rl.group_size" in msg


def test_unknown_nested_key_in_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: {card: micro_moe}\nreward:\n  sandbox:\n    wall_secs: 3\n")
    with pytest.raises(ConfigError, match=r"reward\.sandbox\.wall_secs.*reward\.sandbox\.wall_seconds"):
        load_config(path)


def test_wrong_type():
    assert "rl.group_size" in _err("rl.group_size=abc") and "expected int" in _err("rl.group_size=abc")
    assert "parallel.sequence_parallel" in _err("parallel.sequence_parallel=3")
    assert "rl.loss_agg" in _err("rl.loss_agg=sum")


def test_layout_not_dividing_prints_numbers():
    assert _err("parallel.tp=3") == "parallel.tp(3) does not divide model.num_attention_heads(4)"
    assert _err("parallel.pp=3") == "parallel.pp(3) does not divide model.num_layers(2)"
    assert "parallel.ep(3)" in _err("parallel.ep=3") and "(8)" in _err("parallel.ep=3")
    msg = _err("parallel.tp=2", "parallel.sequence_parallel=true", world_size=5)
    assert "world_size(5)" in msg
    msg = _err("parallel.tp=2", "parallel.sequence_parallel=true", "parallel.dp=1", world_size=4)
    assert msg == "parallel: tp(2)*pp(1)*dp(1) = 2 != world_size(4)"
    assert "sequence_parallel" in _err("parallel.tp=2")


def test_model_cross_checks():
    assert _err("model.topk_group=5") == "model.topk_group(5) must lie in [1, model.n_group(4)]"
    assert "model.router_topk(9)" in _err("model.router_topk=9")


def test_rollout_redundant_experts_refused_training_side_kept():
    # Defect 11: vLLM's EPLB rebalancing moves experts under a loader that maps by the initial placement.
    msg = _err("rollout.redundant_experts=2")
    assert msg.startswith("rollout.redundant_experts(2) > 0") and "rollout.redundant_experts=0" in msg
    validate(load_config(None, ["model.card=micro_moe", "parallel.ep=2", "parallel.redundant_experts=2"]), 2)


def test_missing_card():
    with pytest.raises(ConfigError, match=r"model\.card: no model card 'tiny_mo'.*did you mean 'tiny_moe'"):
        load_config(None, ["model.card=tiny_mo"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.card=micro_moe", "rl.steps"])


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(None, ["model.card=tiny_moe", "rl.steps=7", "reward.weights={accuracy: 1.0, code: 0.5}"])
    path = save_resolved(cfg, tmp_path / "run")
    assert config_from_resolved(path) == cfg


def test_resume_refuses_another_config(tmp_path):
    """A run dir with a checkpoint keeps its config: a rerun that changes what the run computes is
    refused with the keys and both values, and the saved config stays as it was."""
    run = tmp_path / "run"
    first = load_config(None, ["model.card=tiny_moe", "rl.steps=7", "seed=3"])
    save_resolved(first, run)
    save_resolved(load_config(None, ["model.card=tiny_moe", "seed=4"]), run)  # no checkpoint yet: fine
    save_resolved(first, run)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step_000007")
    changed = load_config(None, ["model.card=tiny_moe", "rl.steps=7", "seed=4", "optim.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"another config.*: optim\.lr: 0\.0001 -> 0\.001; seed: 3 -> 4; use"):
        save_resolved(changed, run)
    assert config_from_resolved(run / "config.resolved.yaml") == first
    longer = load_config(None, ["model.card=tiny_moe", "rl.steps=20", "seed=3", "logging.progress=false",
                                "parallel.tp=2", "parallel.sequence_parallel=true"])
    assert config_from_resolved(save_resolved(longer, run)) == longer  # more steps, reporting, layout
    fresh = load_config(None, ["model.card=tiny_moe", "seed=5", "checkpoint.resume=false"])
    assert config_from_resolved(save_resolved(fresh, run)) == fresh


def test_yaml_off_is_the_off_choice_not_a_bool(tmp_path):
    """YAML 1.1 reads a bare `off` as False; a choice that has "off" gets "off" (rl.router_replay)."""
    path = tmp_path / "c.yaml"
    path.write_text("rl:\n  router_replay: off\n")
    assert load_config(path).rl.router_replay == "off"
    assert load_config(None, ["rl.router_replay=off"]).rl.router_replay == "off"
    with pytest.raises(ConfigError, match=r"rl.kl_in: False is not one of"):
        load_config(None, ["rl.kl_in=off"])


def test_sandbox_allows_16_processes_by_default():
    # The default issue 20 asked for (it was 64); the fork-bomb tests in test_sandbox.py set their own.
    assert SandboxConfig().max_processes == 16
    assert load_config(None, ["model.card=micro_moe"]).reward.sandbox.max_processes == 16
