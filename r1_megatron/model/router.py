"""DeepSeek-V3's router on top of megatron-core's TopKRouter (docs/architecture.md#model).

    s = sigmoid(logits)                                   (fp32)
    choice = s + e_score_correction_bias                  (the aux-free expert bias)
    group score = sum of the top-2 `choice` in the group; keep the best topk_group groups
    experts = top-k of `choice` inside the kept groups
    gate = s[experts] / sum(s[experts]) * routed_scaling_factor   (normalized when norm_topk_prob)

Where it departs from megatron-core: megatron's group-limited top-k scores a group by the sum of its
top-(topk / topk_group) scores, which equals DeepSeek-V3's top-2 only when topk / topk_group == 2
(true for the 671B card, false for e.g. top-6 over 2 groups), and it always normalizes the gates.
Everything else (seq aux loss, token counts for the bias update, z-loss) is megatron's own code.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction
from megatron.core.transformer.transformer_config import TransformerConfig


def deepseek_v3_select(
    scores: torch.Tensor, expert_bias: torch.Tensor | None, topk: int, n_group: int, topk_group: int
) -> torch.Tensor:
    """Indices [tokens, topk] of the experts chosen from sigmoid scores [tokens, experts]."""
    choice = scores if expert_bias is None else scores + expert_bias
    if n_group > 1:
        tokens, experts = choice.shape
        grouped = choice.view(tokens, n_group, experts // n_group)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
        kept = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(tokens, experts)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    return choice.topk(topk, dim=-1, sorted=False)[1]


def replayed_or_own(replay: RouterReplay | None, own: torch.Tensor) -> torch.Tensor:
    """The experts to use, [tokens, topk]: this router's `own` choice unless megatron-core's RouterReplay
    (rl/router_replay.py sets it) says otherwise. RECORD records own; REPLAY_FORWARD takes the target
    set for this forward; inside autograd's backward (activation recompute) the targets are taken in
    forward order (REPLAY_BACKWARD's list). Target rows < 0 (positions the rollout never routed, e.g.
    the last response token, padding) keep own. Own is kept on the instance for mismatch metrics."""
    if replay is None:
        return own
    replay.own_topk_idx = own
    action = replay.router_replay_action
    if action is None:
        return own
    if action == RouterReplayAction.RECORD:
        replay.record_indices(own)
        return own
    in_backward = torch._C._current_graph_task_id() != -1
    target = replay.replay_backward_list.pop(0) if in_backward else replay.target_topk_idx
    if target is None or target.shape != own.shape:
        got = None if target is None else tuple(target.shape)
        raise ValueError(f"router replay: layer {replay.layer_label} has routing {got} for {tuple(own.shape)} tokens x topk")
    target = target.to(own.device)
    return torch.where(target[:, :1] >= 0, target, own)


def deepseek_v3_route(
    logits: torch.Tensor,
    expert_bias: torch.Tensor | None,
    topk: int,
    n_group: int,
    topk_group: int,
    scaling_factor: float,
    norm_topk_prob: bool,
    replay: RouterReplay | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate weights and routing map, both [tokens, experts], from router logits [tokens, experts].
    With `replay`, the selection may be replayed (replayed_or_own); the gates are always recomputed
    from these logits, so the gate weights get gradients."""
    scores = torch.sigmoid(logits.float())
    indices = replayed_or_own(replay, deepseek_v3_select(scores, expert_bias, topk, n_group, topk_group))
    gates = scores.gather(1, indices)
    if norm_topk_prob:
        gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
    gates = (gates * scaling_factor).type_as(logits)
    probs = torch.zeros_like(logits).scatter(1, indices, gates)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, indices, True)
    return probs, routing_map


class DeepSeekV3Router(TopKRouter):
    """megatron's TopKRouter with DeepSeek-V3's expert selection.

    Input hidden [s, b, h]; gate weight [experts, h]; buffer expert_bias [experts] (HF's
    `e_score_correction_bias`). Returns probs [s*b, experts] and routing_map [s*b, experts] (bool).
    """

    def __init__(self, config: TransformerConfig, pg_collection=None, norm_topk_prob: bool = True) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        if config.moe_router_score_function != "sigmoid":
            raise ValueError("DeepSeekV3Router needs moe_router_score_function='sigmoid'")
        if config.moe_expert_capacity_factor is not None:
            raise ValueError("DeepSeekV3Router never drops tokens: moe_expert_capacity_factor must be None")
        if self.routing_type == "sinkhorn":
            raise ValueError("DeepSeekV3Router does not do sinkhorn routing")
        self.norm_topk_prob = norm_topk_prob
        self.n_group = config.moe_router_num_groups or 1
        self.topk_group = config.moe_router_group_topk or 1

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        probs, routing_map = deepseek_v3_route(
            logits,
            self.expert_bias,
            self.topk,
            self.n_group,
            self.topk_group,
            self.config.moe_router_topk_scaling_factor or 1.0,
            self.norm_topk_prob,
            self.router_replay,
        )
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            aux_map, aux_scores = compute_routing_scores_for_aux_loss(
                logits, self.topk, self.score_function, fused=False, padding_mask=padding_mask
            )
            masked = padding_mask is not None
            probs = self._apply_aux_loss(probs, aux_scores, aux_map, with_padding_mask=masked)
            probs = self._apply_seq_aux_loss(
                probs, aux_scores, aux_map, seq_length, bsz, with_padding_mask=masked
            )
            probs = self._apply_global_aux_loss(probs, aux_scores, aux_map, with_padding_mask=masked)
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map
