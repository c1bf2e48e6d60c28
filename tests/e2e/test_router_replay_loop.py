"""The real GRPO loop with a bf16 vLLM-CPU rollout, router replay r3 and all three off-policy masks:
two steps run (refit with a bf16-sized canary tolerance, capture, replay in the separate pi_old pass
and the update), and every step logs the mismatch (mean, max, k3), the routing mismatch per MoE
layer, and the fraction each mask removed."""

import pytest

from r1_megatron.config import load_config
from r1_megatron.reward.pool import RewardPool

from ._rewards import digit_share


@pytest.mark.timeout(900)
def test_bf16_rollout_r3_masks_loop(tmp_path):
    from r1_megatron.rl import loop, session
    from r1_megatron.train.metrics import read_metrics

    cfg = load_config("configs/demo_cpu.yaml", [
        f"logging.run_dir={tmp_path}", "logging.tensorboard=false", "logging.progress=false",
        "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=4", "rl.kl_coef=0.01", "rl.eval_every=0",
        "rollout.max_new_tokens=8", "data.seq_length=128", "rollout.dtype=bfloat16", "rl.canary_tol=0.2",
        "rl.router_replay=r3", "rl.icepop=[0.5,5.0]", "rl.mis=[0.5,2.0]", "rl.offpolicy_mask_delta=0.5",
    ])
    pool = RewardPool(cfg.reward, scorer=digit_share, num_workers=1)
    run = session.RunState(cfg, pool=pool)
    try:
        loop.train(cfg, run=run)
    finally:
        run.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 2
    for r in rows:
        assert r["update_ok"] == 1.0
        assert 0 < r["mismatch_abs"] <= r["mismatch_abs_max"]  # bf16 rollout: a real, nonzero gap
        assert r["mismatch_k3"] >= 0
        for key in ("routing_mismatch/layer0", "routing_mismatch/mean", "icepop_masked_frac",
                    "mis_masked_frac", "offpolicy_masked_frac", "offpolicy_masks_removed_frac"):
            assert 0 <= r[key] <= 1, key
