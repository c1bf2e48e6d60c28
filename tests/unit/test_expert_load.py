"""Expert load statistics (moe/expert_load.py), world size 1.

Guarantees: per-step counts are the routing maps' column sums and the moving average follows
ema_1 = load_1, ema_t = d * ema_{t-1} + (1 - d) * load_t (hand-computed); the state round-trips and
a wrong shape is a one-line error; attached to a real micro_moe model, the hook counts exactly the
tokens megatron's own router counter (`local_tokens_per_expert`) counts in a training forward, and
nothing in a no-grad forward.
"""

from __future__ import annotations

import pytest
import torch

from r1_megatron.config.loader import load_card
from r1_megatron.moe.expert_load import ExpertLoad


def _map(rows: list[list[int]], experts: int = 4) -> torch.Tensor:
    m = torch.zeros(len(rows), experts, dtype=torch.bool)
    for t, chosen in enumerate(rows):
        m[t, chosen] = True
    return m


def test_counts_and_moving_average_by_hand():
    load = ExpertLoad(num_layers=2, num_experts=4, decay=0.5)
    load.observe(0, _map([[0, 1], [0, 2], [0, 3]]))  # expert 0: 3 tokens, 1..3: one each
    load.observe(1, _map([[2, 3]]))
    first = load.step()
    assert first.tolist() == [[3, 1, 1, 1], [0, 0, 1, 1]]
    assert load.ema.tolist() == [[3, 1, 1, 1], [0, 0, 1, 1]]
    assert load.counts.sum() == 0
    load.observe(0, _map([[1, 2]]))
    load.step()
    # 0.5 * previous + 0.5 * (0, 1, 1, 0) and 0.5 * previous + 0.5 * 0
    assert load.ema.tolist() == [[1.5, 1.0, 1.0, 0.5], [0.0, 0.0, 0.5, 0.5]]
    assert load.steps == 2


def test_state_round_trip_and_errors():
    load = ExpertLoad(1, 4, decay=0.8)
    load.observe(0, _map([[0, 1]]))
    load.step()
    other = ExpertLoad(1, 4)
    other.observe(0, _map([[3, 2]]))
    other.load_state_dict(load.state_dict())
    assert torch.equal(other.ema, load.ema) and other.steps == 1 and other.decay == 0.8
    assert other.counts.sum() == 0
    with pytest.raises(ValueError, match=r"shape \(1, 4\), model \(2, 4\)"):
        ExpertLoad(2, 4).load_state_dict(load.state_dict())
    with pytest.raises(ValueError, match="decay"):
        ExpertLoad(1, 4, decay=1.0)


@pytest.mark.timeout(120)
def test_hook_counts_what_megatron_router_counts():
    from megatron.core.transformer.moe.router import TopKRouter

    from r1_megatron.model.provider import build_model
    from r1_megatron.parallel.device import single_rank_world

    card = load_card("micro_moe")
    single_rank_world(seed=3)
    model = build_model(card)
    load = ExpertLoad(card.num_layers - card.first_k_dense, card.num_experts)
    load.attach(model, card.first_k_dense)
    routers = [m for m in model.decoder.modules() if isinstance(m, TopKRouter)]
    assert len(routers) == card.num_layers - card.first_k_dense
    for r in routers:
        r.local_tokens_per_expert.zero_()
    tokens = torch.randint(0, card.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).expand(2, 24)
    model.train()
    model(tokens, positions, None, labels=tokens)
    expected = torch.stack([r.local_tokens_per_expert.double() for r in routers])
    assert float(expected.sum()) == 2 * 24 * card.router_topk * len(routers)
    assert torch.equal(load.counts, expected)
    with torch.no_grad():
        model(tokens, positions, None, labels=tokens)
    assert torch.equal(load.counts, expected)  # logprob-style forwards are not counted
    assert torch.equal(load.step(), expected)
    load.detach()
