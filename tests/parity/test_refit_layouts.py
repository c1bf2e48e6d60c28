"""The refit checked against vLLM itself, from split trainer layouts.

A 4-rank trainer world (tests/parity/_refit_worker.py) builds tiny_moe at (tp2, dp2) and at
(pp2 split 2+1 layers, ep2, dp2), each from its own seed, and writes for each the refit stream (the
production gather, which every rank receives) and the HF export of the same weights. The engine runs
here, in the pytest process, and rank 0's stream reaches it through a file, so that it can be compared
with a fresh engine loaded from the export (one live engine per process). A GRPO run refits its
colocated engines in process at these layouts: tests/dist/test_grpo_layouts.py.

Guarantees, for each layout:
- the stream holds exactly the HF export's tensors: no name missing or extra, the same shapes and values;
- an engine built from other weights (a random tiny_moe checkpoint) and refitted with the stream has
  every vLLM parameter bit-identical to an engine freshly loaded from the export, the same greedy
  token ids, and fp32 teacher-forced logprobs equal within 1e-5;
- the refit is not a no-op: before it, the engine's greedy outputs and logprobs differ from the fresh
  engine's.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from r1_megatron.checkpoint.hf_io import HFCheckpoint  # noqa: E402
from r1_megatron.config.loader import load_card  # noqa: E402
from r1_megatron.config.schema import RolloutConfig  # noqa: E402
from r1_megatron.model.random_hf import make_hf_checkpoint  # noqa: E402
from r1_megatron.rollout.refit import Refitter  # noqa: E402
from r1_megatron.rollout.vllm_engine import VLLMEngine  # noqa: E402
from tests.dist._launch import check_ok, launch  # noqa: E402
from tests.parity.test_vllm_engine import CANARY, GREEDY, PROMPTS, max_err, vllm_params  # noqa: E402

TOL = 1e-5
# tag -> "tp,pp,ep[,first_stage_layers]", on 4 ranks (dp fills the rest); see _refit_worker.py
LAYOUTS = {"tp2": "2,1,1", "pp2_ep2": "1,2,2,2"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("refit_layouts")
    argv = ["tests/parity/_refit_worker.py", str(out), *(f"{tag}:{spec}" for tag, spec in LAYOUTS.items())]
    check_ok(launch(argv, 4, out / "logs", timeout=300))
    return out


def outputs(engine: VLLMEngine) -> dict:
    return {"params": vllm_params(engine), "greedy": engine.generate(PROMPTS, 1, GREEDY),
            "logprobs": engine.logprobs(CANARY)}


@pytest.fixture(scope="module")
def runs(exported, tmp_path_factory) -> dict:
    """Per layout: the engine's outputs just before and after its refit, and a fresh engine's.

    One engine is refitted with each layout in turn; the fresh engines come after it (vLLM allows one
    live engine per process)."""
    initial = tmp_path_factory.mktemp("initial_hf")
    # The engine must know every streamed name, the MTP layer's included: the card's own checkpoint.
    make_hf_checkpoint(load_card("tiny_moe"), initial, seed=5)
    result: dict = {tag: {} for tag in LAYOUTS}
    engine = VLLMEngine(initial, RolloutConfig())
    try:
        refitter = Refitter(engine, bucket_mb=1.0)
        current = outputs(engine)
        for tag in LAYOUTS:
            result[tag]["before"] = current
            refitter.refit(iter(torch.load(exported / f"{tag}_stream.pt")))
            current = result[tag]["refit"] = outputs(engine)
    finally:
        engine.close()
    for tag in LAYOUTS:
        fresh = VLLMEngine(exported / f"{tag}_hf", RolloutConfig())
        try:
            result[tag]["fresh"] = outputs(fresh)
        finally:
            fresh.close()
    return result


@pytest.mark.parametrize("tag", LAYOUTS)
def test_stream_is_the_hf_export(exported, tag):
    stream = torch.load(exported / f"{tag}_stream.pt")
    export = HFCheckpoint(exported / f"{tag}_hf")
    names = [name for name, _ in stream]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(export.keys())
    assert any(".experts.7." in n for n in names)
    assert any(n.endswith("e_score_correction_bias") for n in names)
    for name, tensor in stream:
        assert tensor.shape == export(name).shape and torch.equal(tensor, export(name)), name


@pytest.mark.parametrize("tag", LAYOUTS)
def test_refit_equals_fresh_load(runs, tag):
    refit, fresh = runs[tag]["refit"], runs[tag]["fresh"]
    assert refit["params"].keys() == fresh["params"].keys()
    assert [n for n in refit["params"] if not torch.equal(refit["params"][n], fresh["params"][n])] == []
    assert refit["greedy"] == fresh["greedy"]
    err = max_err(refit["logprobs"], fresh["logprobs"])
    assert err <= TOL, f"max |logprob error| {err:.3g}"


@pytest.mark.parametrize("tag", LAYOUTS)
def test_refit_is_not_a_noop(runs, tag):
    before, fresh = runs[tag]["before"], runs[tag]["fresh"]
    assert [s[0].token_ids for s in before["greedy"]] != [s[0].token_ids for s in fresh["greedy"]]
    err = max_err(before["logprobs"], fresh["logprobs"])
    assert err > 1e-2, f"max |logprob error| {err:.3g}"
