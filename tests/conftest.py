"""Shared test setup: fp32 determinism, a `gpu` marker that skips without CUDA, a tmp run dir."""

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocess ranks inherit it (see pytest_configure)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # Tiny models on a 2-core machine: one intra-op thread per process avoids oversubscription
    # (multi-rank tests run several processes; measured 35 ms vs 0.03 ms for a tiny matmul).
    import torch

    torch.set_num_threads(1)
