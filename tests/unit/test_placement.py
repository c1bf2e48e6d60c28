"""Colocated placement's arithmetic (rollout/placement.py): which engine a rank belongs to, which
prompts each engine generates, and the one-line error for a rollout.tp that does not fit the world."""

import pytest

from r1_megatron.config.loader import ConfigError
from r1_megatron.rollout.placement import agree, colocated_slot


@pytest.mark.parametrize("world,tp", [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 2)])
def test_engines_are_consecutive_rank_groups_that_split_the_prompts(world, tp):
    slots = [colocated_slot(tp, r, world) for r in range(world)]
    assert [s.index for s in slots] == [r // tp for r in range(world)]
    for s in slots:
        assert s.count == world // tp and s.ranks == tuple(range(s.index * tp, s.index * tp + tp))
    assert [s.rank for s in slots if s.leader] == list(range(0, world, tp))
    for n in (0, 1, 5, 16):
        leaders = [s.share(n) for s in slots if s.leader]
        assert sorted(i for share in leaders for i in share) == list(range(n))  # each prompt exactly once
        for s in slots:  # every rank of an engine submits its leader's list
            assert s.share(n) == slots[s.ranks[0]].share(n)


def test_a_rollout_tp_that_does_not_divide_the_world_is_a_config_error():
    with pytest.raises(ConfigError, match=r"rollout.tp\(3\) must be >= 1 and divide the world size \(4\)"):
        colocated_slot(3, 0, 4)


def test_descriptions_name_the_engine_and_its_ranks():
    assert colocated_slot(2, 3, 4).describe() == "engine 1 (ranks 2-3)"
    assert colocated_slot(1, 3, 4).describe() == "engine 3 (rank 3)"


def test_agree_at_world_1_raises_the_error_itself():
    error = ValueError("boom")
    with pytest.raises(ValueError, match="boom"):
        agree(colocated_slot(1, 0, 1), error, "rollout")
    agree(colocated_slot(1, 0, 1), None, "rollout")
