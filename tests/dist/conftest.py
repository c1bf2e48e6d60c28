"""Shared fixtures of the multi-rank tests: the single-rank reference run and the layout runs.

Each is one launched job (processes import megatron once and go through several checks), computed
once per session and used by several test modules, to keep tests/dist short on 2 cores.
"""

from pathlib import Path

import pytest
import torch

from tests.dist._launch import check_ok, launch
from tests.dist._scenarios import WORLD2, WORLD4


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict:
    """world_size=1 on micro_moe: initial checkpoint, one SFT step, exported weights, logprobs."""
    out = tmp_path_factory.mktemp("reference")
    check_ok(launch(["tests/dist/_scenarios.py", "reference", str(out)], 1, out / "logs", timeout=240))
    result = torch.load(out / "reference.pt", weights_only=False)
    result["dir"] = Path(out)
    return result


def _layouts(reference: dict, specs: list[str], world: int, out: Path) -> dict:
    argv = ["tests/dist/_scenarios.py", "layouts", str(out), reference["init"], *specs]
    check_ok(launch(argv, world, out / "logs", timeout=420))
    result = torch.load(out / "layouts.pt", weights_only=False)
    result["dir"] = out
    return result


@pytest.fixture(scope="session")
def world2(reference, tmp_path_factory) -> dict:
    return _layouts(reference, WORLD2, 2, tmp_path_factory.mktemp("world2"))


@pytest.fixture(scope="session")
def world4(reference, tmp_path_factory) -> dict:
    """Also holds ckpt_2_2_1_2_1_allgather_save/: the initial weights saved from (tp2, pp2)."""
    return _layouts(reference, WORLD4, 4, tmp_path_factory.mktemp("world4"))
