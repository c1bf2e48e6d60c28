"""rl/mismatch.py: the step's max |log pi_old - log pi_vllm| over loss tokens, hand-computed, with the
pi_old pass separate (extras old_logprobs) and fused (this forward's logprobs stand in)."""

import torch

from r1_megatron.config.schema import RLConfig
from r1_megatron.rl.loss import grpo_loss
from r1_megatron.train.microbatch import Microbatch
from r1_megatron.rl.mismatch import MaxGap
from r1_megatron.rl.types import LossNorm


def _mb(old: list[float] | None) -> Microbatch:
    n = 4
    extras = {"rollout_logprobs": torch.tensor([[0.0, -1.0, -2.0, -9.0]]), "advantages": torch.ones(1, n),
              "token_seq_len": torch.full((1, n), 2.0)}
    if old is not None:
        extras["old_logprobs"] = torch.tensor([old])
    return Microbatch(torch.zeros(1, n, dtype=torch.long), torch.zeros(1, n, dtype=torch.long),
                      torch.tensor([[0.0, 1.0, 1.0, 0.0]]), torch.arange(n)[None], extras=extras)


def test_max_gap_over_loss_tokens_only():
    cfg, norm = RLConfig(kl_coef=0.0), LossNorm(2, 1, 4)
    lp = torch.tensor([[0.0, -1.25, -1.5, 0.0]])
    gap = MaxGap()
    fn = gap.wrap(grpo_loss(cfg, norm))
    fn(lp, _mb([5.0, -1.1, -2.3, 0.0]))  # separate pass: |-1.1+1| = 0.1, |-2.3+2| = 0.3; position 3 (9) is off the mask
    fn(lp, _mb(None))  # fused: this forward's logprobs, |-1.25+1| = 0.25, |-1.5+2| = 0.5
    assert abs(gap.metrics()["mismatch_abs_max"] - 0.5) < 1e-6
