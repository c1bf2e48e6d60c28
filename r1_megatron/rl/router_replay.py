"""Router replay (docs/grpo.md#router-replay) and the rollout-vs-trainer routing mismatch.

`rl.router_replay: r3` makes every MoE layer of the trainer's forward (log pi_old and the update)
select exactly the experts vLLM selected while sampling (`Sample.routed_experts`: logical ids per
position and MoE layer). The gate weights are still recomputed from the trainer's own router
scores (model/router.py `replayed_or_own`), so the gate gets gradients; only the selection is fixed.

Mechanics. Each decoder MoE router of the policy gets its own megatron-core `RouterReplay`
instance, installed here rather than through `moe_enable_routing_replay`: that flag would give
every model built from the config (the frozen reference, the MTP layer) instances in megatron's
process-wide list, whose order `set_replay_data` relies on, so a second model would shift or steal
the policy's targets. Our instances are taken out of that global list and addressed per router
(by MoE layer index), and the MTP layer's router gets none (its own routing stays).
Within `routing(...)`, the i-th forward of each model chunk (one per microbatch, in schedule
order) gets microbatch i's targets. A router pre-hook cuts them to what this rank's router sees:
its sequence-parallel shard under TP+SP (the whole row under plain TP), this PP stage's layers,
the tokens in [s, b] order; EP does not change what a router sees (it routes before dispatch).
Activation recompute re-runs routers inside backward: each target set for a forward is kept in
RouterReplay's backward list and consumed in forward order (megatron's REPLAY_BACKWARD).

The frozen reference keeps its own routing: the KL term measures the distance to the initial
policy as that network computes, and feeding it the current policy's rollout routing would make
the "reference" drift with the policy. Positions the rollout never routed (the last response
token, which vLLM never feeds back, and padding) keep the trainer's own choice: no loss token
depends on them (causal attention; the last position predicts nothing that is scored).

Mismatch: whenever samples carry routing, the same hooks count per MoE layer the tokens whose
trainer-chosen top-k set differs from the rollout's (`routing_mismatch/layer<i>`), also under r3
(there the trainer's own choice is compared before it is replaced).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from r1_megatron.config.schema import RLConfig
from r1_megatron.train.microbatch import Microbatch
from r1_megatron.rl.types import Sample, sample_key


def _core(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def moe_layer_indices(config) -> list[int]:
    """Global indices of the MoE layers (megatron's moe_layer_freq: a 0/1 pattern or every n-th)."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i for i in range(config.num_layers) if i % freq == 0]
    return [i for i, f in enumerate(freq) if f]


def moe_routers(model: torch.nn.Module) -> list[tuple[int, TopKRouter]]:
    """(MoE layer index, router) of this model chunk's decoder MoE layers; the MTP layer's excluded."""
    core = _core(model)
    moe = moe_layer_indices(core.config)
    out = []
    for layer in core.decoder.layers:
        router = getattr(layer.mlp, "router", None)
        if isinstance(router, TopKRouter):
            out.append((moe.index(layer.layer_number - 1), router))
    return out


def install(model: torch.nn.Module) -> list[tuple[int, TopKRouter]]:
    """Give each decoder MoE router of `model` its own RouterReplay (idempotent); see the module doc."""
    routers = moe_routers(model)
    for idx, router in routers:
        if router.router_replay is None:
            replay = RouterReplay()
            RouterReplay.global_router_replay_instances.remove(replay)
            replay.layer_label = idx
            router.router_replay = replay
    return routers


def check_routing(sample: Sample, num_moe: int, topk: int) -> torch.Tensor:
    """The sample's routed_experts as long [P + R - 1, num_moe, topk]; a one-line error naming the sample."""
    name = f"sample (group {sample.group_id}, index {sample.sample_index})"
    r = sample.routed_experts
    if r is None:
        raise ValueError(f"rl.router_replay: {name} has no routed_experts (the rollout did not capture routing)")
    want = (len(sample.prompt_ids) + sample.response_len - 1, num_moe, topk)
    if tuple(r.shape) != want:
        raise ValueError(f"rl.router_replay: {name} has routed_experts of shape {tuple(r.shape)}, expected "
                         f"{want} (prompt + response - 1 positions, MoE layers, topk)")
    return r.long()


def microbatch_routing(mb: Microbatch, samples: dict[int, Sample], num_moe: int, topk: int) -> torch.Tensor:
    """long [num_moe, b, s, topk]: the rollout's experts at each position of `mb` (-1: none), found through
    extras["sample_key"] and position_ids (both packings; a shared prompt takes its first response's)."""
    key = mb.extras["sample_key"].round().long().clone()
    pos = mb.position_ids.long()
    if mb.segment_prefix is not None:  # shared-prompt prefix segments take a referencing segment's sample
        cu = mb.cu_seqlens.long().tolist()
        for seg in range(len(cu) - 2, -1, -1):  # reversed: the first response's segment wins
            p = int(mb.segment_prefix[seg])
            if p >= 0:
                key[0, cu[p] : cu[p + 1]] = key[0, cu[seg]]
    if ((key == 0) & (mb.loss_mask > 0)).any():
        raise ValueError("rl.router_replay: a loss token has no sample key (sample keys need group_id < 4095 "
                         "and sample_index < 4096, rl/types.py sample_key)")
    out = torch.full((num_moe, *mb.shape, topk), -1, dtype=torch.long)
    for k in key.unique().tolist():
        if k == 0:
            continue
        if k not in samples:
            raise ValueError(f"rl.router_replay: microbatch position has sample key {k}, not in this batch")
        routed = check_routing(samples[k], num_moe, topk)
        where = (key == k) & (pos < routed.shape[0])
        out[:, where] = routed[pos[where]].permute(1, 0, 2)
    return out


def batch_routing(mbs: Sequence[Microbatch], samples: Sequence[Sample], num_moe: int, topk: int) -> list[torch.Tensor]:
    by_key = {k: s for s in samples if (k := sample_key(s))}
    return [microbatch_routing(mb, by_key, num_moe, topk) for mb in mbs]


def _local_rows(full: torch.Tensor, s_local: int, sequence_parallel: bool) -> torch.Tensor:
    """[b, S, topk] -> [s_local * b, topk]: the rows this rank's router sees, in megatron's [s, b] order."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    sp = tp > 1 and sequence_parallel
    total = s_local * (tp if sp else 1)
    b, s, k = full.shape
    if s > total:
        raise ValueError(f"router replay: routing for {s} positions, the forward has {total}")
    if s < total:
        full = torch.cat([full, full.new_full((b, total - s, k), -1)], dim=1)
    start = parallel_state.get_tensor_model_parallel_rank() * s_local if sp else 0
    return full[:, start : start + s_local].transpose(0, 1).reshape(-1, k)


class RoutingCounts:
    """Per MoE layer: [tokens whose trainer top-k set differs from the rollout's, tokens compared]."""

    def __init__(self, num_moe: int, sequence_parallel: bool) -> None:
        self.counts = torch.zeros(num_moe, 2, dtype=torch.float64)
        self.sequence_parallel = sequence_parallel

    def add(self, layer: int, own: torch.Tensor, target: torch.Tensor) -> None:
        valid = target[:, 0] >= 0
        differ = (own.sort(dim=1)[0] != target.to(own.device).sort(dim=1)[0]).any(dim=1) & valid.to(own.device)
        self.counts[layer, 0] += float(differ.sum())
        self.counts[layer, 1] += float(valid.sum())

    def metrics(self) -> dict[str, float]:
        """Summed over DP ranks, SP shards and PP stages: the fraction per layer and over all layers."""
        c = self.counts.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else c.device
            c = c.to(dev)
            dist.all_reduce(c, group=parallel_state.get_data_parallel_group())
            if self.sequence_parallel:  # each TP rank compared its own shard
                dist.all_reduce(c, group=parallel_state.get_tensor_model_parallel_group())
            # Each PP stage holds its own layers' counts (zeros elsewhere).
            dist.all_reduce(c, group=parallel_state.get_pipeline_model_parallel_group())
            c = c.cpu()
        out = {f"routing_mismatch/layer{i}": float(d / max(n, 1)) for i, (d, n) in enumerate(c.tolist())}
        out["routing_mismatch/mean"] = float(c[:, 0].sum() / c[:, 1].sum().clamp(min=1))
        return out


class Recorded:
    """r2: the trainer's own selection per router (by model chunk and MoE layer), one local
    [tokens, topk] tensor per microbatch forward, in order."""

    def __init__(self) -> None:
        self.rows: dict[tuple[int, int], list[torch.Tensor]] = {}


@contextlib.contextmanager
def routing(models: Sequence[torch.nn.Module], targets: list[torch.Tensor] | None, mode: str,
            recorded: Recorded | None = None, sequence_parallel: bool = False) -> Iterator[RoutingCounts]:
    """Within the block, forward i of each model chunk (one per microbatch, in schedule order) sees
    targets[i] [num_moe, b, s, topk] (the rollout's routing, -1 where none; None: not captured).

    mode "compare": routers keep their own choice, compared with the rollout's (metrics only);
    "r3": the rollout's choice is replayed; "r2_record": own choice kept and stored in `recorded`;
    "r2": the choice stored in `recorded` (same microbatches, same ranks) is replayed."""
    if mode not in ("compare", "r3", "r2_record", "r2"):
        raise ValueError(f"router replay: unknown mode {mode!r}")
    if mode == "r3" and targets is None:
        raise ValueError("rl.router_replay=r3: the samples carry no routing (rollout capture is off)")
    chunks = [(m, install(m)) for m in models]
    num_moe = len(moe_layer_indices(_core(models[0]).config))
    counts = RoutingCounts(num_moe, sequence_parallel)
    replay = mode in ("r3", "r2")
    handles = []
    for c, (model, routers) in enumerate(chunks):
        state = {"next": 0, "current": None}

        def on_model(_mod, _args, state=state) -> None:
            if torch._C._current_graph_task_id() != -1:
                return
            if targets is not None:
                if state["next"] >= len(targets):
                    raise ValueError(f"router replay: forward {state['next'] + 1}, routing for {len(targets)} microbatches")
                state["current"] = targets[state["next"]]
            state["next"] += 1

        handles.append(_core(model).register_forward_pre_hook(on_model))
        for idx, router in routers:
            rr = router.router_replay
            rr.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD if replay else None)
            own_rows = recorded.rows.setdefault((c, idx), []) if recorded is not None else None

            def on_router(_mod, args, idx=idx, rr=rr, state=state, own_rows=own_rows) -> None:
                if torch._C._current_graph_task_id() != -1:
                    return  # recompute inside backward: the backward list already holds the target
                s_local = args[0].shape[0]
                rr.compare_rows = None if state["current"] is None else _local_rows(
                    state["current"][idx], s_local, sequence_parallel)
                if mode == "r3":
                    rr.set_target_indices(rr.compare_rows)
                elif mode == "r2":
                    rr.set_target_indices(own_rows[state["next"] - 1])

            def after_router(_mod, _args, _out, idx=idx, rr=rr, own_rows=own_rows) -> None:
                if torch._C._current_graph_task_id() != -1:
                    return
                if rr.compare_rows is not None:
                    counts.add(idx, rr.own_topk_idx, rr.compare_rows)
                if mode == "r2_record":
                    own_rows.append(rr.own_topk_idx.detach().clone())

            handles.append(router.register_forward_pre_hook(on_router))
            handles.append(router.register_forward_hook(after_router))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()
        for _model, routers in chunks:
            for _idx, router in routers:
                router.router_replay.clear_indices()
                router.router_replay.clear_router_replay_action()


class StepRouting:
    """The routing of one optimizer step's microbatches: built in prepare, used by the pi_old pass and
    the update. Without captured routing (and rl.router_replay off) it does nothing and logs nothing."""

    def __init__(self, trainer, mbs: Sequence[Microbatch], samples: Sequence[Sample], cfg: RLConfig) -> None:
        self.trainer, self.mode = trainer, cfg.router_replay
        core = _core(trainer.model[0])
        captured = all(s.routed_experts is not None for s in samples)
        self.targets = None
        if self.mode == "r3" or captured:  # r3 without routing: check_routing names the sample
            num_moe = len(moe_layer_indices(core.config))
            self.targets = batch_routing(mbs, samples, num_moe, core.config.moe_router_topk)
        self.recorded = Recorded() if self.mode == "r2" else None

    def _routing(self, mode: str):
        if self.targets is None and mode == "compare":
            return contextlib.nullcontext(None)
        return routing(self.trainer.model, self.targets, mode, self.recorded,
                       self.trainer.layout.sequence_parallel)

    def old_pass(self):
        """Around the separate pi_old forward: r3 replays, r2 records, otherwise compare."""
        return self._routing({"r3": "r3", "r2": "r2_record"}.get(self.mode, "compare"))

    def update(self, old_pass_ran: bool):
        """Around the training forward(s). r2 replays what the pi_old pass recorded; with the pi_old
        forward fused into this one there is nothing to replay: the trainer's own routing is r2's."""
        if self.mode == "r2" and not old_pass_ran:
            return self._routing("compare")
        return self._routing(self.mode if self.mode != "off" else "compare")


def routing_metrics(counts: RoutingCounts | None) -> dict[str, float]:
    return {} if counts is None else counts.metrics()
