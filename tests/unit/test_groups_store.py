"""A world-1 job outside torchrun starts its group without touching os.environ (CI saw EADDRINUSE when a
leaked MASTER_PORT, still bound by an in-process store, reached a later subprocess)."""
import os

import torch.distributed as dist

from r1_megatron.config.loader import load_config
from r1_megatron.parallel.groups import destroy_process_groups, init_process_groups


def test_world_one_group_leaves_the_environment_alone(monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    before = dict(os.environ)
    cfg = load_config("configs/micro_moe_sft.yaml", [])
    init_process_groups(cfg)
    try:
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert dict(os.environ) == before
    finally:
        destroy_process_groups()
    assert not dist.is_initialized()
