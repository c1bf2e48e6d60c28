"""Offload frees every storage (size 0) and reload restores params, grads and optimizer state
bit-exactly, keeping the same tensor objects so the optimizer keeps working."""

import pytest
import torch

from r1_megatron.offload import Offloader, model_tensors, optimizer_tensors


def _trained_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model.register_buffer("bias_like", torch.randn(4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
    model(torch.randn(8, 16)).pow(2).mean().backward()  # leave grads populated
    return model, opt


def _snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def test_round_trip_is_bit_exact_and_frees_storage():
    model, opt = _trained_model()
    tensors = [*model_tensors(model), *optimizer_tensors(opt)]
    assert any(t is p.grad for p in model.parameters() for t in tensors)
    assert sum(1 for s in opt.state.values() for v in s.values() if torch.is_tensor(v)) >= 6
    before = _snapshot(tensors)
    distinct = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    off = Offloader(tensors)
    stats = off.offload()
    assert stats["bytes"] == sum(distinct.values()) > 0
    assert all(t.untyped_storage().nbytes() == 0 for t in tensors)
    off.reload()
    for a, b in zip(before, tensors):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


def test_shared_storage_views_are_moved_once_and_stay_views():
    flat = torch.arange(12, dtype=torch.float32)
    a, b = flat[:6].view(2, 3), flat[6:]
    off = Offloader([a, b, flat])
    assert off.offload()["bytes"] == 12 * 4
    off.reload()
    a.add_(1)  # still a view of `flat` after the round trip
    assert flat[0].item() == 1.0 and torch.equal(b, torch.arange(6, 12, dtype=torch.float32))


def test_training_continues_identically_after_round_trip():
    model, opt = _trained_model()
    twin, twin_opt = _trained_model()
    off = Offloader([*model_tensors(model), *optimizer_tensors(opt)])
    stats = {"offload": off.offload()}
    assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
    stats["reload"] = off.reload()
    assert stats["reload"]["bytes"] == stats["offload"]["bytes"]
    for m, o in ((model, opt), (twin, twin_opt)):
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_misuse_is_an_error():
    off = Offloader([torch.ones(3)])
    try:
        off.reload()
    except RuntimeError as e:
        assert "without offload" in str(e)
    else:
        raise AssertionError("reload before offload must fail")


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
            if t.untyped_storage().nbytes() > 0}


def _optimizer_state(optimizer) -> list[torch.Tensor]:
    """The Adam moments (and step counters) of megatron's optimizer, read from its inner torch optimizers."""
    inners = [getattr(o, "optimizer", o) for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [v for inner in inners for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]


def test_trainer_offload_reaches_adam_state_created_at_the_first_step():
    """Defect 5: the loop builds its offloader before the first step, when Adam has no moments yet.
    A snapshot of the tensors then never moves them; TrainerOffload collects at each offload and
    moves every optimizer-state byte, then the params, and brings all back bit-exactly."""
    from megatron.core import parallel_state as ps

    from r1_megatron.config.loader import load_config
    from r1_megatron.offload import TrainerOffload
    from r1_megatron.parallel.device import single_rank_world
    from r1_megatron.parallel.groups import resolve_layout
    from r1_megatron.train.trainer import Trainer
    from tests.dist._scenarios import sft_step

    cfg = load_config("configs/micro_moe_sft.yaml", ["parallel.micro_batch_size=1"])
    trainer = Trainer(cfg, resolve_layout(cfg, 1), single_rank_world(seed=3))
    assert ps.get_data_parallel_world_size() == 1
    model = trainer.model[0]
    off = TrainerOffload(model, trainer.optimizer, pin_memory=False)
    snapshot = Offloader([*model_tensors(model), *optimizer_tensors(trainer.optimizer)])  # the old way
    assert _optimizer_state(trainer.optimizer) == []
    sft_step(trainer, seed=1)
    state = _optimizer_state(trainer.optimizer)
    state_bytes = sum(_storages(state).values())
    assert len(state) >= 3 * len(list(model.parameters())) and state_bytes > 0  # exp_avg, exp_avg_sq, step

    snapshot.offload()
    assert sum(_storages(state).values()) == state_bytes  # the snapshot left every moment in place
    snapshot.reload()

    params = list(model.parameters())
    grads = [g for p in params for g in (getattr(p, "main_grad", None), p.grad) if g is not None]
    grad_bytes = sum(_storages(grads).values())
    before = [t.detach().clone() for t in (*params, *state, *grads)]
    moved = off.state.offload()
    assert _storages(state) == {} and _storages(grads) == {}  # every optimizer-state and grad byte is off
    assert moved["bytes"] == state_bytes + grad_bytes > 0
    assert all(p.untyped_storage().nbytes() > 0 for p in params)  # the refit still reads the params
    off.params.offload()
    assert _storages(params) == {}
    off.reload()
    for a, b in zip(before, (*params, *state, *grads), strict=True):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


@pytest.mark.gpu
def test_cuda_offload_frees_state_then_params_and_restores():
    """CUDA: `state.offload()` frees exactly the grads' and Adam moments' bytes (created lazily at the
    first step) while the params stay; `params.offload()` frees the params; `reload()` restores all
    into pinned-host round trips bit-exactly."""
    from r1_megatron.offload import TrainerOffload

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    off = TrainerOffload(model, opt)  # before the first step, as the loop builds it
    model(torch.randn(8, 256, device="cuda")).pow(2).mean().backward()
    opt.step()
    params = list(model.parameters())
    state = _optimizer_state(opt)  # Adam's step counters stay on the host; the moments are on CUDA
    grads = [p.grad for p in params]
    on_cuda = [t for t in (*state, *grads) if t.is_cuda]
    expected = sum(_storages((*state, *grads)).values())
    before = [t.detach().clone().cpu() for t in (*params, *state, *grads)]
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    assert off.state.offload()["bytes"] == expected
    assert start - torch.cuda.memory_allocated() >= sum(t.numel() * t.element_size() for t in on_cuda) > 0
    assert all(p.untyped_storage().nbytes() > 0 for p in params)
    off.params.offload()
    assert all(p.untyped_storage().nbytes() == 0 for p in params)
    off.reload()
    for a, b in zip(before, (*params, *state, *grads), strict=True):
        assert torch.equal(a, b.detach().cpu())
