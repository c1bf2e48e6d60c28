"""Worker side of tests/dist/test_redundant_experts.py: `python _redundant_scenarios.py MODE OUT_DIR`.

Modes (run under tests/dist/_launch.py; results go to OUT_DIR as torch files, compared by the test):
  equivalence OUT   world 2, EP 2: a model without redundancy and the same weights with 2 redundant
                    slots, under a skewed router; 5 steps, a rebalance, 1 more step (allgather
                    dispatcher), then 2 steps with the alltoall dispatcher. Losses, grad norms,
                    exported HF weights, replica bit-identity and per-rank token loads.
  checkpoint OUT    world 4, EP 2, 4 redundant slots: 3 steps with a rebalance every 2, save; resume
                    at EP 2 and at EP 4 (re-planned). Placements, exported weights and logprobs.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import gc
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _scenarios import all_logprobs, build, exported, job_config, save_rank0, sft_step, start  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

from r1_megatron.moe.redundant import redundant_layers, slot_params  # noqa: E402
from r1_megatron.parallel.device import seed_all  # noqa: E402
from r1_megatron.parallel.groups import resolve_layout  # noqa: E402

# Aux-free expert bias favouring the first groups: a hot-spotted router (experts 0-3 on EP rank 0).
SKEW = torch.tensor([0.06, 0.05, 0.04, 0.03, 0.0, 0.0, 0.0, 0.0])


def trainer_same_groups(cfg):
    """A Trainer on the process groups already set (both models of a comparison share them)."""
    from r1_megatron.train.trainer import Trainer

    seed_all(cfg.seed)
    return Trainer(cfg, resolve_layout(cfg, dist.get_world_size()), torch.device("cpu"))


def _gather_ep(local: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack([t.detach() for t in local])
    group = ps.get_expert_model_parallel_group()
    parts = [torch.empty_like(stacked) for _ in range(group.size())]
    dist.all_gather(parts, stacked, group=group)
    return torch.cat(parts)


@torch.no_grad()
def copy_into_redundant(base: torch.nn.Module, red: torch.nn.Module) -> None:
    """Give `red` (redundant experts) the weights of `base`: same names for everything but the
    experts; slot s of a redundant layer gets logical expert phy2log[s] of the base layer."""
    base_state = base.state_dict()
    slots = tuple(f"{n}.experts." for n, m in red.named_modules() if m in redundant_layers(red))
    for name, t in red.state_dict().items():
        if torch.is_tensor(t) and not name.startswith(slots):
            t.copy_(base_state[name])
    base_layers = dict(base.named_modules())
    for name, layer in red.named_modules():
        if layer in redundant_layers(red):
            src = slot_params(base_layers[name])  # the base layer's local experts (E / ep of them)
            for key in src[0]:
                logical = _gather_ep([s[key] for s in src])
                for params, slot in zip(slot_params(layer), layer.local_slots, strict=True):
                    params[key].copy_(logical[layer.phy2log[slot]])


def skew_router(model: torch.nn.Module) -> None:
    for m in model.modules():
        if getattr(m, "expert_bias", None) is not None and m.expert_bias.numel() == SKEW.numel():
            m.expert_bias.copy_(SKEW)


def replica_spread(trainer) -> float:
    """Largest difference between two replicas of one expert, over weights and Adam moments."""
    worst = 0.0
    for layer in redundant_layers(trainer.unwrapped):
        slots = slot_params(layer)
        for key in slots[0]:
            tensors = {"w": [s[key].data for s in slots]}
            for opt in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
                st = [opt.optimizer.state.get(s[key], {}) for s in slots]
                for moment in ("exp_avg", "exp_avg_sq"):
                    if all(moment in x for x in st):
                        tensors[moment] = [x[moment] for x in st]
            for local in tensors.values():
                full = _gather_ep(local)
                for e in range(layer.log2phy.shape[0]):
                    reps = layer.log2phy[e, : layer.logcnt[e]]
                    worst = max(worst, float((full[reps] - full[reps[0]]).abs().max()))
    return worst


def rank_loads_redundant(trainer) -> list[float]:
    """Tokens each EP rank's slots received since the slot counters were zeroed (global batch)."""
    layer = redundant_layers(trainer.unwrapped)[0]
    per_slot = layer.slot_tokens.double()
    dist.all_reduce(per_slot)
    return per_slot.view(trainer.layout.ep, -1).sum(1).tolist()


def twin_trainers(dispatcher: str):
    """EP 2 without redundancy, and the same weights with 2 redundant slots; both skewed."""
    base = trainer_same_groups(job_config(ep=2, dispatcher=dispatcher))
    red = trainer_same_groups(job_config(ep=2, redundant_experts=2, dispatcher=dispatcher))
    copy_into_redundant(base.unwrapped, red.unwrapped)
    skew_router(base.unwrapped)
    skew_router(red.unwrapped)
    return base, red


def equivalence(out: Path) -> None:
    start(job_config(ep=2))
    base, red = twin_trainers("allgather")
    manager = red.replicas
    res: dict = {"metrics": [], "exports": {}, "spread": {}, "loads": {}, "placement": {}}
    res["placement"]["default"] = redundant_layers(red.unwrapped)[0].phy2log.tolist()

    def step(s: int) -> None:
        redundant_layers(red.unwrapped)[0].slot_tokens.zero_()
        res["metrics"].append((sft_step(base, seed=s), sft_step(red, seed=s)))
        res["loads"][s] = {"base_logical": base.replicas.load.last, "red_logical": manager.load.last,
                           "red_ranks": rank_loads_redundant(red)}

    step(1)
    res["exports"][1] = (exported(base), exported(red))
    for s in range(2, 6):
        step(s)
    res["spread"][5] = replica_spread(red)
    res["exports"][5] = (exported(base), exported(red))
    placement = manager.rebalance()
    res["placement"]["rebalanced"] = placement.phy2log[0].tolist()
    res["spread"]["rebalanced"] = replica_spread(red)
    res["logprobs_after_rebalance"] = (all_logprobs(base, 7), all_logprobs(red, 7))
    step(6)
    res["spread"][6] = replica_spread(red)
    res["exports"][6] = (exported(base), exported(red))
    del base, red, manager
    gc.collect()
    base, red = twin_trainers("alltoall")
    res["alltoall"] = {"metrics": [(sft_step(base, seed=s), sft_step(red, seed=s)) for s in (1, 2)],
                       "exports": (exported(base), exported(red)), "spread": replica_spread(red)}
    save_rank0(res, out / "equivalence.pt")


def checkpoint(out: Path) -> None:
    from r1_megatron.train import checkpointing as ckpt

    cfg = job_config(ep=2, redundant_experts=4)
    start(cfg)
    trainer = build(cfg, 4)
    skew_router(trainer.unwrapped)
    trainer.replicas.rebalance_every = 2  # the Trainer re-plans from the measured loads after step 2
    default = trainer.replicas.state_dict()["phy2log"]
    for s in (1, 2, 3):
        sft_step(trainer, seed=40 + s)
    path = ckpt.save(trainer, out / "ckpt")
    saved = trainer.replicas
    res = {"default": default, "saved": {"phy2log": saved.state_dict()["phy2log"], "ema": saved.load.ema.clone(),
                     "weights": exported(trainer), "logprobs": all_logprobs(trainer, 44)}}
    del trainer, saved
    gc.collect()
    for name, ep in (("ep2", 2), ("ep4", 4)):
        c = dataclasses.replace(job_config(ep=ep, redundant_experts=4), seed=cfg.seed + 7)  # another init
        fresh = build(c, 4)
        ckpt.load(fresh, path)
        m = fresh.replicas
        res[name] = {"phy2log": m.state_dict()["phy2log"], "ema": m.load.ema.clone(), "ep": ep,
                     "weights": exported(fresh), "logprobs": all_logprobs(fresh, 44),
                     "spread": replica_spread(fresh)}
        res[name]["loss_next"] = sft_step(fresh, seed=45)["loss"]
        res[name]["weights_next"] = exported(fresh)  # the update used the carried Adam moments
        del fresh, m
        gc.collect()
    save_rank0(res, out / "checkpoint.pt")


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    mode, out_dir = sys.argv[1:3]
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    {"equivalence": equivalence, "checkpoint": checkpoint}[mode](out_path)
