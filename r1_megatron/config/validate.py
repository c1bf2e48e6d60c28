"""Cross-field checks. Each message names the keys and prints the numbers."""

from __future__ import annotations

from pathlib import Path

from r1_megatron.config.schema import ConfigError, JobConfig, RolloutConfig


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether `directory` holds an HF tokenizer (tokenizer.json or tokenizer_config.json)."""
    return (Path(directory) / "tokenizer.json").is_file() or (Path(directory) / "tokenizer_config.json").is_file()


def _divides(a_key: str, a: int, b_key: str, b: int) -> None:
    if a <= 0 or b % a != 0:
        raise ConfigError(f"{a_key}({a}) does not divide {b_key}({b})")


def validate_model(cfg: JobConfig) -> None:
    m = cfg.model
    for key in ("hidden_size", "num_layers", "num_attention_heads", "vocab_size", "ffn_hidden_size"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key} must be positive, got {getattr(m, key)}")
    if not 0 <= m.first_k_dense <= m.num_layers:
        raise ConfigError(f"model.first_k_dense({m.first_k_dense}) must lie in [0, model.num_layers({m.num_layers})]")
    if m.num_experts:
        if not 1 <= m.router_topk <= m.num_experts:
            raise ConfigError(f"model.router_topk({m.router_topk}) must lie in [1, model.num_experts({m.num_experts})]")
        _divides("model.n_group", m.n_group, "model.num_experts", m.num_experts)
        if not 1 <= m.topk_group <= m.n_group:
            raise ConfigError(f"model.topk_group({m.topk_group}) must lie in [1, model.n_group({m.n_group})]")
        per_group = m.num_experts // m.n_group
        if m.topk_group * per_group < m.router_topk:
            raise ConfigError(
                f"model.topk_group({m.topk_group}) groups of {per_group} experts cannot hold "
                f"model.router_topk({m.router_topk}) experts"
            )
    if m.num_key_value_heads is not None:
        _divides("model.num_key_value_heads", m.num_key_value_heads, "model.num_attention_heads", m.num_attention_heads)


def stage_layers(num_layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Transformer layers per pipeline stage, as megatron's num_layers_in_{first,last}_pipeline_stage
    split them: the first/last stage may be set, the stages between share the rest evenly."""
    if pp == 1:
        if first not in (None, num_layers) or last not in (None, num_layers):
            raise ConfigError(f"parallel.first/last_stage_layers need parallel.pp > 1, got pp({pp})")
        return [num_layers]
    if first is None and last is None:
        _divides("parallel.pp", pp, "model.num_layers", num_layers)
        return [num_layers // pp] * pp
    head = [first] if first is not None else []
    tail = [last] if last is not None else []
    for key, n in (("first_stage_layers", first), ("last_stage_layers", last)):
        if n is not None and n < 0:
            raise ConfigError(f"parallel.{key} must be >= 0, got {n}")
    middle_stages = pp - len(head) - len(tail)
    rest = num_layers - sum(head) - sum(tail)
    if rest < 0 or (middle_stages == 0 and rest != 0) or (middle_stages and rest % middle_stages):
        raise ConfigError(
            f"parallel: model.num_layers({num_layers}) minus first_stage_layers({first}) and "
            f"last_stage_layers({last}) = {rest} does not split evenly over the {middle_stages} other stages "
            f"of parallel.pp({pp})"
        )
    return head + [rest // middle_stages] * middle_stages + tail if middle_stages else head + tail


def validate_parallel(cfg: JobConfig, world_size: int | None = None) -> None:
    """Check the layout against the model; with world_size, also check tp*pp*dp == world_size."""
    p, m = cfg.parallel, cfg.model
    for key in ("tp", "pp", "ep", "etp"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallel.{key} must be >= 1, got {getattr(p, key)}")
    _divides("parallel.tp", p.tp, "model.num_attention_heads", m.num_attention_heads)
    _divides("parallel.tp", p.tp, "model.vocab_size", m.vocab_size)
    _divides("parallel.tp", p.tp, "model.ffn_hidden_size", m.ffn_hidden_size)
    if m.num_key_value_heads is not None:
        _divides("parallel.tp", p.tp, "model.num_key_value_heads", m.num_key_value_heads)
    stage_layers(m.num_layers, p.pp, p.first_stage_layers, p.last_stage_layers)
    if m.num_experts:
        slots = m.num_experts + p.redundant_experts
        _divides("parallel.ep", p.ep, "physical expert slots (model.num_experts + parallel.redundant_experts)", slots)
        _divides("parallel.etp", p.etp, "model.moe_ffn_hidden_size", m.moe_ffn_hidden_size)
        if p.tp > 1 and not p.sequence_parallel:
            raise ConfigError(f"parallel.sequence_parallel must be true with parallel.tp({p.tp}) > 1 and MoE")
    elif p.ep > 1:
        raise ConfigError(f"parallel.ep({p.ep}) > 1 needs experts, but model.num_experts is 0")
    if p.redundant_experts < 0:
        raise ConfigError(f"parallel.redundant_experts must be >= 0, got {p.redundant_experts}")
    if world_size is not None:
        model_par = p.tp * p.pp
        if world_size % model_par:
            raise ConfigError(
                f"parallel: tp({p.tp})*pp({p.pp}) = {model_par} does not divide world_size({world_size})"
            )
        dp = p.dp or world_size // model_par
        if p.tp * p.pp * dp != world_size:
            raise ConfigError(f"parallel: tp({p.tp})*pp({p.pp})*dp({dp}) = {p.tp * p.pp * dp} != world_size({world_size})")
        if (p.etp * p.ep * p.pp) and world_size % (p.etp * p.ep * p.pp):
            raise ConfigError(
                f"parallel: etp({p.etp})*ep({p.ep})*pp({p.pp}) = {p.etp * p.ep * p.pp} does not divide world_size({world_size})"
            )


def validate(cfg: JobConfig, world_size: int | None = None) -> None:
    validate_model(cfg)
    validate_parallel(cfg, world_size)
    r = cfg.rl
    if r.group_size < 2:
        raise ConfigError(f"rl.group_size({r.group_size}) must be >= 2 for group-relative advantages")
    if r.prompts_per_step < 1:
        raise ConfigError(f"rl.prompts_per_step({r.prompts_per_step}) must be >= 1")
    if not r.entropy_coef >= 0:  # the loss applies only a positive bonus: anything else would be ignored
        raise ConfigError(f"rl.entropy_coef({r.entropy_coef}) must be >= 0 (0: no entropy bonus)")
    for key in ("mis", "icepop"):
        b = getattr(r, key)
        if b is not None and (len(b) != 2 or not 0 <= b[0] <= b[1]):
            raise ConfigError(f"rl.{key}({b}) must be [low, high] with 0 <= low <= high")
    if r.offpolicy_mask_delta is not None and not r.offpolicy_mask_delta >= 0:
        raise ConfigError(f"rl.offpolicy_mask_delta({r.offpolicy_mask_delta}) must be >= 0")
    if cfg.rollout.max_new_tokens < 1:
        raise ConfigError(f"rollout.max_new_tokens({cfg.rollout.max_new_tokens}) must be >= 1")
    spec = cfg.rollout.speculative
    if spec.method == "mtp" and not cfg.model.mtp_num_layers:
        raise ConfigError("rollout.speculative.method(mtp) needs an MTP head, but model.mtp_num_layers is 0")
    if spec.num_speculative_tokens < 1:
        raise ConfigError(f"rollout.speculative.num_speculative_tokens({spec.num_speculative_tokens}) must be >= 1")
    if r.mtp_loss_coef < 0 or (r.mtp_loss_coef > 0 and not cfg.model.mtp_num_layers):
        raise ConfigError(
            f"rl.mtp_loss_coef({r.mtp_loss_coef}) must be >= 0, and > 0 needs model.mtp_num_layers "
            f"({cfg.model.mtp_num_layers}) > 0"
        )
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p({cfg.rollout.top_p}) must lie in (0, 1]")
    validate_rollout(cfg)
    refuse_rollout_redundant_experts(cfg.rollout)
    if cfg.data.tokenizer and not has_tokenizer_files(cfg.data.tokenizer):
        raise ConfigError(f"data.tokenizer: {cfg.data.tokenizer} is not a directory with tokenizer files "
                          "(tokenizer.json or tokenizer_config.json)")
    for name, w in cfg.reward.weights.items():
        if w != w:
            raise ConfigError(f"reward.weights.{name} is NaN")


def refuse_rollout_redundant_experts(ro: RolloutConfig) -> None:
    """Redundant rollout expert slots are refused, here and by the engine itself (rollout/vllm_engine.py).

    vLLM 0.32 takes redundant slots only with enable_eplb, whose rebalancing (every
    eplb_config.step_interval engine steps, no off switch) moves experts between slots while its loader,
    and so every refit, still maps them by the initial placement: after the first rebalance a refit
    writes experts into the wrong slots. parallel.redundant_experts (training) is fine."""
    if ro.redundant_experts:
        raise ConfigError(
            f"rollout.redundant_experts({ro.redundant_experts}) > 0 needs vLLM's EPLB, whose "
            "rebalancing makes refits land in the wrong expert slots; set rollout.redundant_experts=0")


def validate_rollout(cfg: JobConfig) -> None:
    """Engine placement and one-step-off-policy rollout (rollout/separate.py, rl/async_rollout.py)."""
    ro = cfg.rollout
    if ro.engines < 1:
        raise ConfigError(f"rollout.engines({ro.engines}) must be >= 1")
    if ro.timeout_s <= 0:
        raise ConfigError(f"rollout.timeout_s({ro.timeout_s}) must be > 0")
    if ro.placement == "separate" and (cfg.rl.router_replay != "off" or ro.capture_routing):
        raise ConfigError(f"rl.router_replay={cfg.rl.router_replay} / rollout.capture_routing={ro.capture_routing} "
                          "needs rollout.placement=colocated: separate engines do not capture routing yet")
    if ro.async_ != "off" and ro.placement != "separate":
        raise ConfigError(f"rollout.async={ro.async_} needs rollout.placement=separate (got {ro.placement}): "
                          "colocated engines share the trainer's devices, so generation cannot overlap training")
    if ro.async_ != "off" and cfg.rl.tis is None:
        raise ConfigError(f"rollout.async={ro.async_} needs a TIS cap rl.tis (e.g. rl.tis=2.0): off-policy "
                          "samples are reweighted by min(pi_old / pi_rollout, rl.tis)")
