"""Offload frees every storage (size 0) and reload restores params, grads and optimizer state
bit-exactly, keeping the same tensor objects so the optimizer keeps working."""

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
    with off.offloaded_during("rollout") as stats:
        assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
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
