"""Worker side of tests/dist/test_router_replay_split.py: `python tests/dist/_replay_scenarios.py MODE OUT [ARGS]`.

  reference OUT          world 1: initial checkpoint; one GRPO step under r3 on a shared-prompt packed batch
  layouts OUT INIT L...  for each layout L ("tp,pp,ep,etp,dp,dispatcher"): load INIT, the same step

Every rank also reads the routing back from its routers (forward hooks on the routing maps) and
checks it equals its own shard of the captured ids (SP shard, PP stage's layers, DP share).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from r1_megatron.config.schema import RLConfig  # noqa: E402
from r1_megatron.rl import router_replay  # noqa: E402
from r1_megatron.rl.batching import microbatches  # noqa: E402
from r1_megatron.rl.loss import grpo_loss  # noqa: E402
from r1_megatron.rl.types import RolloutBatch, Sample  # noqa: E402
from tests.dist._scenarios import build, job_config, save_rank0, start  # noqa: E402

R3 = RLConfig(router_replay="r3", kl_coef=0.0)


def samples(num_moe: int = 1, topk: int = 2, experts: int = 8) -> RolloutBatch:
    """4 groups x 3 responses with random ids; each group's samples share their prompt's routing."""
    g = torch.Generator().manual_seed(11)
    out = []
    for k in range(4):
        prompt = torch.randint(3, 100, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        rows = torch.rand(len(prompt), num_moe, experts, generator=g).argsort(-1)[..., :topk]
        for j in range(3):
            n = int(torch.randint(2, 8, (1,), generator=g))
            resp = torch.rand(n - 1, num_moe, experts, generator=g).argsort(-1)[..., :topk]
            out.append(Sample(prompt_ids=prompt, response_ids=torch.randint(3, 100, (n,), generator=g).tolist(),
                              rollout_logprobs=(-torch.rand(n, generator=g)).tolist(), group_id=k, sample_index=j,
                              advantage=float(torch.randn(1, generator=g)),
                              routed_experts=torch.cat([rows, resp]).to(torch.uint8)))
    return RolloutBatch(out)


def step(trainer) -> dict:
    batch = samples()
    mbs = microbatches(batch, 24, 1, share_prompts=True)
    plan = router_replay.StepRouting(trainer, mbs, batch.samples, R3)
    maps = []
    hooks = [r.register_forward_hook(lambda m, a, out: maps.append(out[1].detach().clone()))
             for c in trainer.model for _i, r in router_replay.moe_routers(c)]
    with plan.update(old_pass_ran=False):
        metrics = trainer.train_step(mbs, grpo_loss(R3, batch.loss_norm(8)))
    for h in hooks:
        h.remove()
    metrics["readback_ok"] = float(_readback(trainer, plan.targets, maps))
    return metrics


def _readback(trainer, targets, maps) -> bool:
    """This rank's routers chose exactly its shard of the captured ids, wherever there are some."""
    routers = [(i, r) for c in trainer.model for i, r in router_replay.moe_routers(c)]
    if not routers:
        return True
    sp = trainer.layout.sequence_parallel
    it = iter(maps)
    for t in targets:
        for idx, _r in routers:
            got = next(it)
            want = router_replay._local_rows(t[idx], got.shape[0], sp)
            valid = want[:, 0] >= 0
            m = torch.zeros_like(got).scatter(1, want.clamp(min=0), True)
            if not torch.equal(got[valid], m[valid]):
                return False
    return next(it, None) is None


def reference(out: Path) -> None:
    from r1_megatron.train import checkpointing as ckpt

    cfg = job_config()
    start(cfg)
    trainer = build(cfg, 1)
    init = ckpt.save(trainer, out / "init")
    torch.save({"metrics": step(trainer), "init": str(init)}, out / "reference.pt")


def layouts(out: Path, init: str, specs: list[str]) -> None:
    import torch.distributed as dist

    from r1_megatron.train import checkpointing as ckpt

    results, started = {}, False
    for spec in specs:
        tp, pp, ep, etp, dp, dispatcher = spec.split(",")
        cfg = job_config(tp=int(tp), pp=int(pp), ep=int(ep), etp=int(etp), dp=int(dp), dispatcher=dispatcher)
        if not started:
            start(cfg)
            started = True
        trainer = build(cfg, dist.get_world_size())
        ckpt.load(trainer, init, with_optimizer=False)
        metrics = step(trainer)
        ok = torch.tensor([metrics["readback_ok"]])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        results[spec] = {**metrics, "readback_ok": float(ok)}
        del trainer
        gc.collect()
    save_rank0(results, out / "layouts.pt")


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "reference":
        reference(out)
    else:
        layouts(out, sys.argv[3], sys.argv[4:])
