"""Router replay (rl/router_replay.py) on micro_moe at world size 1, through the trainer's own forwards.

Guarantees:
- r3 on a packed shared-prompt batch: every MoE router selects exactly the captured ids at every
  position that has them (read back from the routers' routing maps), also with random ids that no
  router would choose; positions without routing keep the router's own choice;
- negative control: the "rollout" routing is the trainer's own at the unperturbed weights; with noise
  on the gate weights the router's own choice differs (routing_mismatch > 0), r3 restores the rollout
  routing exactly (mismatch counted before replacement, routing read back equal), and the r3 logprobs
  differ from the no-replay ones; at the unperturbed weights r3 changes no logprob;
- the gates get gradients under r3 (the selection is fixed, the weights are not), also with full
  activation recompute (targets consumed again inside backward: REPLAY_BACKWARD);
- r2 replays the selection recorded at the pi_old pass;
- a second model in the process gets no replay instances and megatron's global list is untouched;
- bad input: r3 with a sample without routing or with routing of the wrong shape is a one-line error
  naming the sample.
"""

import pytest
import torch
from megatron.core.transformer.moe.router_replay import RouterReplay

from r1_megatron.config.loader import load_config
from r1_megatron.config.schema import RLConfig
from r1_megatron.parallel.device import single_rank_world
from r1_megatron.parallel.groups import resolve_layout
from r1_megatron.rl import router_replay
from r1_megatron.rl.batching import microbatches
from r1_megatron.rl.loss import grpo_loss
from r1_megatron.train.microbatch import Microbatch
from r1_megatron.train.trainer import Trainer
from r1_megatron.rl.shared_prompts import EXTRAS, FILL
from r1_megatron.rl.types import RolloutBatch, Sample, sequence_tensors

OVERRIDES = ["optim.lr=0.0", "model.bias_update_rate=0.0", "model.seq_aux_loss_coeff=0.0", "optim.clip_grad=0.0"]
R3 = RLConfig(router_replay="r3", kl_coef=0.0)


def _batch(groups: int = 2, g: int = 3, seed: int = 0) -> RolloutBatch:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for k in range(groups):
        prompt = torch.randint(3, 100, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist()
        for j in range(g):
            n = int(torch.randint(2, 9, (1,), generator=gen))
            samples.append(Sample(prompt_ids=prompt, response_ids=torch.randint(3, 100, (n,), generator=gen).tolist(),
                                  rollout_logprobs=[-1.0] * n, group_id=k, sample_index=j,
                                  advantage=float(torch.randn(1, generator=gen))))
    return RolloutBatch(samples)


def _random_routing(batch: RolloutBatch, num_moe: int, topk: int, experts: int, seed: int = 1) -> None:
    """Distinct random expert ids per position; a group's samples share their prompt's rows."""
    gen = torch.Generator().manual_seed(seed)
    for group in batch.groups():
        p = len(group[0].prompt_ids)
        prompt_rows = torch.rand(p, num_moe, experts, generator=gen).argsort(-1)[..., :topk]
        for s in group:
            resp = torch.rand(s.response_len - 1, num_moe, experts, generator=gen).argsort(-1)[..., :topk]
            s.routed_experts = torch.cat([prompt_rows, resp]).to(torch.uint8)


@pytest.fixture(scope="module", autouse=True)
def world():
    return single_rank_world(seed=3)


@pytest.fixture(scope="module")
def trainer(world):
    cfg = load_config("configs/micro_moe_sft.yaml", OVERRIDES)
    return Trainer(cfg, resolve_layout(cfg, 1), world)


def _shape(trainer):
    c = trainer.unwrapped.config
    return len(router_replay.moe_layer_indices(c)), c.moe_router_topk, c.num_moe_experts


def _selected(trainer, run, recomputed: list | None = None) -> list[torch.Tensor]:
    """Run `run()`; the routers' routing maps, per forward and MoE router (bool [tokens, experts]).
    Those of routers re-run inside backward (activation recompute) go to `recomputed`."""
    maps: list[torch.Tensor] = []

    def keep(_m, _a, out) -> None:
        in_backward = torch._C._current_graph_task_id() != -1
        (recomputed if in_backward else maps).append(out[1].detach().clone())

    hooks = [r.register_forward_hook(keep) for _i, r in router_replay.moe_routers(trainer.model[0])]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return maps


def _targets_as_maps(targets: list[torch.Tensor], experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(valid rows, bool map) per microbatch and MoE layer, in the order the routers run."""
    out = []
    for t in targets:
        for layer in t:  # [b, s, k] -> [s*b, k] in megatron's [s, b] order
            rows = layer.transpose(0, 1).reshape(-1, layer.shape[-1])
            valid = rows[:, 0] >= 0
            m = torch.zeros(rows.shape[0], experts, dtype=torch.bool)
            m[valid] = torch.zeros(int(valid.sum()), experts, dtype=torch.bool).scatter(1, rows[valid], True)
            out.append((valid, m))
    return out


def test_r3_shared_prompt_forward_uses_exactly_the_captured_ids(trainer):
    num_moe, topk, experts = _shape(trainer)
    batch = _batch()
    _random_routing(batch, num_moe, topk, experts)
    mbs = microbatches(batch, 40, share_prompts=True)
    plan = router_replay.StepRouting(trainer, mbs, batch.samples, R3)
    with plan.old_pass():
        maps = _selected(trainer, lambda: trainer.forward_logprobs(mbs))
    want = _targets_as_maps(plan.targets, experts)
    assert len(maps) == len(want)
    checked = 0
    for got, (valid, m) in zip(maps, want, strict=True):
        got = got[: valid.shape[0]]
        assert torch.equal(got[valid], m[valid])
        assert (got.sum(-1) == topk).all()  # positions without routing: the router's own top-k
        checked += int(valid.sum())
    assert checked > 0
    assert all(r.router_replay.router_replay_action is None for _i, r in router_replay.moe_routers(trainer.model[0]))


def _own_routing(trainer, batch: RolloutBatch) -> None:
    """Each sample's routed_experts = the trainer's own selection, one sample per forward (the "rollout")."""
    for s in batch.samples:
        (mb,) = microbatches(RolloutBatch([s]), 64)
        rec = router_replay.Recorded()
        with router_replay.routing(trainer.model, None, "r2_record", rec):
            trainer.forward_logprobs([mb])
        n = len(s.prompt_ids) + s.response_len - 1
        rows = [rec.rows[(0, i)][0][:n] for i in range(len(rec.rows))]
        s.routed_experts = torch.stack(rows, dim=1).to(torch.uint8)


def test_negative_control_noisy_gates_replay_restores_rollout_routing(world):
    cfg = load_config("configs/micro_moe_sft.yaml", OVERRIDES)
    tr = Trainer(cfg, resolve_layout(cfg, 1), world)
    num_moe, topk, experts = _shape(tr)
    batch = _batch(seed=4)
    _own_routing(tr, batch)
    mbs = microbatches(batch, 48)
    same = router_replay.StepRouting(tr, mbs, batch.samples, R3)
    with same.old_pass():
        lp_r3_clean = tr.forward_logprobs(mbs)
    lp_clean = tr.forward_logprobs(mbs)
    assert max(float((a - b).abs().max()) for a, b in zip(lp_r3_clean, lp_clean, strict=True)) <= 1e-6
    with torch.no_grad():
        for _i, r in router_replay.moe_routers(tr.model[0]):
            r.weight.add_(0.5 * torch.randn_like(r.weight))
    plan = router_replay.StepRouting(tr, mbs, batch.samples, RLConfig(kl_coef=0.0))
    with plan.old_pass() as counts:
        lp_off = tr.forward_logprobs(mbs)
    assert counts.metrics()["routing_mismatch/mean"] > 0.05
    plan = router_replay.StepRouting(tr, mbs, batch.samples, R3)
    lp_r3: list = []
    with plan.old_pass() as counts:
        maps = _selected(tr, lambda: lp_r3.extend(tr.forward_logprobs(mbs)))
    for got, (valid, m) in zip(maps, _targets_as_maps(plan.targets, experts), strict=True):
        assert torch.equal(got[: valid.shape[0]][valid], m[valid])
    assert counts.metrics()["routing_mismatch/mean"] > 0.05  # the own choice, counted before replacement
    assert max(float((a - b).abs().max()) for a, b in zip(lp_r3, lp_off, strict=True)) > 1e-3


def _padded(batch: RolloutBatch, rows: int) -> list[Microbatch]:
    """Padded [rows, T] microbatches (megatron's full recompute does not take packed streams here)."""
    seqs = [sequence_tensors(s) for s in batch.samples]
    t = max(len(q.tokens) for q in seqs)

    def stack(part, name, fill):
        out = torch.full((len(part), t), fill, dtype=getattr(part[0], name).dtype)
        for i, q in enumerate(part):
            out[i, : len(q.tokens)] = getattr(q, name)
        return out

    mbs = []
    for i in range(0, len(seqs), rows):
        part = seqs[i : i + rows]
        mbs.append(Microbatch(stack(part, "tokens", 0), stack(part, "labels", 0), stack(part, "loss_mask", 0.0),
                              torch.arange(t).expand(len(part), t).clone(),
                              extras={n: stack(part, n, FILL[n]) for n in EXTRAS}))
    return mbs


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_gates_get_gradients_under_r3(world, recompute):
    cfg = load_config("configs/micro_moe_sft.yaml", [*OVERRIDES, f"parallel.recompute={recompute}"])
    tr = Trainer(cfg, resolve_layout(cfg, 1), world)
    num_moe, topk, experts = _shape(tr)
    batch = _batch(seed=2)
    _random_routing(batch, num_moe, topk, experts, seed=5)
    mbs = _padded(batch, rows=2)  # two rows: the [s, b] token order matters
    plan = router_replay.StepRouting(tr, mbs, batch.samples, R3)
    recomputed: list = []
    with plan.update(old_pass_ran=False):
        maps = _selected(tr, lambda: tr.train_step(mbs, grpo_loss(R3, batch.loss_norm(16))), recomputed)
    for got, (valid, m) in zip(maps, _targets_as_maps(plan.targets, experts), strict=True):
        assert torch.equal(got[: valid.shape[0]][valid], m[valid])
    # Full recompute re-runs each router inside backward, microbatch by microbatch: it replays the same.
    assert len(recomputed) == (len(maps) if recompute == "full" else 0)
    assert all(torch.equal(a, b) for a, b in zip(recomputed, maps[: len(recomputed)], strict=True))
    for _i, r in router_replay.moe_routers(tr.model[0]):
        assert r.weight.main_grad.abs().max() > 0


def test_r2_replays_the_pi_old_selection(trainer):
    batch = _batch(seed=6)
    mbs = microbatches(batch, 40)
    plan = router_replay.StepRouting(trainer, mbs, batch.samples, RLConfig(router_replay="r2", kl_coef=0.0))
    with plan.old_pass():
        recorded_maps = _selected(trainer, lambda: trainer.forward_logprobs(mbs))
    with torch.no_grad():
        saved = [r.weight.clone() for _i, r in router_replay.moe_routers(trainer.model[0])]
        for _i, r in router_replay.moe_routers(trainer.model[0]):
            r.weight.add_(torch.randn_like(r.weight))
    try:
        with plan.update(old_pass_ran=True):
            replayed = _selected(trainer, lambda: trainer.forward_logprobs(mbs))
    finally:
        with torch.no_grad():
            for w, (_i, r) in zip(saved, router_replay.moe_routers(trainer.model[0]), strict=True):
                r.weight.copy_(w)
    assert all(torch.equal(a, b) for a, b in zip(recorded_maps, replayed, strict=True))


def test_a_second_model_gets_no_replay_instances(trainer, world):
    router_replay.install(trainer.model[0])
    before = len(RouterReplay.global_router_replay_instances)
    cfg = load_config("configs/micro_moe_sft.yaml", OVERRIDES)
    other = Trainer(cfg, resolve_layout(cfg, 1), world, for_training=False)
    assert all(r.router_replay is None for _i, r in router_replay.moe_routers(other.model[0]))
    assert all(r.router_replay is not None for _i, r in router_replay.moe_routers(trainer.model[0]))
    assert len(RouterReplay.global_router_replay_instances) == before


def test_bad_routing_is_a_one_line_error_naming_the_sample(trainer):
    num_moe, topk, experts = _shape(trainer)
    batch = _batch()
    _random_routing(batch, num_moe, topk, experts)
    batch.samples[4].routed_experts = None
    mbs = microbatches(batch, 40)
    with pytest.raises(ValueError, match=r"sample \(group 1, index 1\) has no routed_experts"):
        router_replay.StepRouting(trainer, mbs, batch.samples, R3)
    _random_routing(batch, num_moe, topk, experts)
    batch.samples[2].routed_experts = batch.samples[2].routed_experts[:-1]
    with pytest.raises(ValueError, match=r"sample \(group 0, index 2\) has routed_experts of shape"):
        router_replay.StepRouting(trainer, mbs, batch.samples, R3)


def test_samples_beyond_the_key_range_are_refused_not_misrouted(trainer):
    num_moe, topk, experts = _shape(trainer)
    batch = _batch(groups=1)
    _random_routing(batch, num_moe, topk, experts)
    for s in batch.samples:
        s.group_id = 5000
    mbs = microbatches(batch, 40)
    with pytest.raises(ValueError, match=r"a loss token has no sample key \(sample keys need group_id < 4095"):
        router_replay.StepRouting(trainer, mbs, batch.samples, R3)
