"""The MTP loss during RL (rl.mtp_loss_coef, rl/mtp.py) on micro_moe, one step, fp32 on CPU over gloo.

Guarantees:
- with the trunk detached (rl.mtp_detach_trunk), every trunk parameter's gradient (embedding, decoder,
  final norm, output layer) is bit-identical to the step without the MTP loss, while the MTP head's
  gradients are nonzero (it learns) and the MTP loss is reported;
- attached (the negative control), the trunk's gradients differ: the check can fail;
- split invariance with the MTP loss on: (tp2) and (pp2, MTP on the last stage) give world 1's
  loss, MTP loss and grad norm within 1e-5; after the Adam step, pp2's weights all agree within 1e-5
  and tp2's MTP-layer weights do. tp2's trunk weights are not held to 1e-5: Adam divides each
  gradient by its own magnitude, so TP's reduction-order rounding on an element with a tiny gradient
  comes out at lr scale (measured: one routed-expert element of decoder layer 1 off by 1.2e-5 while
  the loss and grad norm agree to 7e-7); that is the trunk's split invariance, which
  tests/dist/test_split_invariance.py covers, and the MTP head does not touch the trunk.
"""

import pytest
import torch

from tests.dist._launch import check_ok, launch

TOL = 1e-5
LAYOUTS = ["2,1,1,2,1,allgather", "1,2,1,1,1,allgather"]
ALL_WEIGHTS = {"1,2,1,1,1,allgather"}


@pytest.fixture(scope="module")
def world1(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("mtp_grads")
    check_ok(launch(["tests/dist/_mtp_scenarios.py", "grads", str(out)], 1, out / "logs", timeout=300))
    return torch.load(out / "grads.pt", weights_only=False)


def _split(grads: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    head = {n: g for n, g in grads.items() if n.startswith("mtp.")}
    trunk = {n: g for n, g in grads.items() if not n.startswith("mtp.")}
    return trunk, head


def test_detached_mtp_loss_leaves_trunk_gradients_bit_exact(world1):
    off_trunk, off_head = _split(world1["off"]["grads"])
    on_trunk, on_head = _split(world1["detached"]["grads"])
    assert {"embedding.word_embeddings.weight", "output_layer.weight"} <= set(on_trunk)
    for name, g in off_trunk.items():
        assert torch.equal(on_trunk[name], g), name
    assert all(not g.any() for g in off_head.values())  # MTP not run: its head gets nothing
    assert sum(bool(g.any()) for g in on_head.values()) >= len(on_head) - 2, "the head does not learn"
    assert world1["detached"]["metrics"]["mtp_loss"] > 1.0


def test_attached_mtp_loss_moves_the_trunk(world1):
    off_trunk, _ = _split(world1["off"]["grads"])
    on_trunk, _ = _split(world1["attached"]["grads"])
    differ = [n for n, g in off_trunk.items() if not torch.equal(on_trunk[n], g)]
    for name in ("embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"):
        assert name in differ, name


@pytest.mark.timeout(480)
def test_split_invariance_with_mtp_loss(world1, tmp_path):
    argv = ["tests/dist/_mtp_scenarios.py", "layouts", str(tmp_path), world1["init"], *LAYOUTS]
    check_ok(launch(argv, 2, tmp_path / "logs", timeout=420))
    got = torch.load(tmp_path / "layouts.pt", weights_only=False)
    ref = world1["split"]
    for spec in LAYOUTS:
        for key in ("loss", "mtp_loss", "grad_norm"):
            assert abs(got[spec]["metrics"][key] - ref["metrics"][key]) <= TOL, (spec, key)
        assert set(got[spec]["weights"]) == set(ref["weights"])
        mtp_layer = f"model.layers.{world1['num_layers']}."
        for name, want in ref["weights"].items():
            if spec not in ALL_WEIGHTS and not name.startswith(mtp_layer):
                continue
            err = (got[spec]["weights"][name] - want).abs().max().item()
            assert err <= TOL, (spec, name, err)
