"""Shared fixtures of the multi-rank tests: the single-rank reference run (one process, world 1)."""

from pathlib import Path

import pytest
import torch

from tests.dist._launch import check_ok, launch


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict:
    """world_size=1 on micro_moe: initial checkpoint, one SFT step, exported weights, logprobs."""
    out = tmp_path_factory.mktemp("reference")
    check_ok(launch(["tests/dist/_scenarios.py", "reference", str(out)], 1, out / "logs", timeout=240))
    result = torch.load(out / "reference.pt", weights_only=False)
    result["dir"] = Path(out)
    return result
