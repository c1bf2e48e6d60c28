"""Expert load statistics: tokens per logical expert per MoE layer, as EPLB's input (docs/architecture.md).

Counts come from the routers themselves: a forward hook on every decoder router adds the routing
map's column sums ([E] tokens routed to each logical expert) to this step's counts. Only forwards
that build a graph are counted, so activation recompute (whose first pass runs without grad) and
logprob-only forwards do not count twice. `step()` sums the counts over all ranks (every token
sits on exactly one DP x CP x TP-sequence shard and one pipeline stage holds each layer, so the sum
over the world is the global batch's load) and folds them into an exponential moving average.

The MTP layer's router is not counted: EPLB places the decoder's experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter

from r1_megatron.parallel.collectives import all_reduce_


class ExpertLoad:
    """Per-step and moving-average expert loads.

    counts: [L, E] float64 on the routers' device, tokens routed to each logical expert of each of
    the L MoE decoder layers since the last `step()` (this rank's share); ema: [L, E] float64 (host),
    the moving average of global step loads (all zeros before the first step); last: [L, E] (host),
    the latest global step load;
    steps: steps folded in so far.
    """

    def __init__(self, num_layers: int, num_experts: int, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ExpertLoad: decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.ema = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.last = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.steps = 0
        self._hooks: list = []

    def observe(self, layer: int, routing_map: torch.Tensor) -> None:
        """Add one routing map ([T, E] bool: token t routed to expert e) of MoE layer `layer`."""
        self.counts[layer] += routing_map.sum(dim=0).to(self.counts.device, torch.float64)

    def attach(self, model: torch.nn.Module, first_k_dense: int) -> None:
        """Count every decoder router of `model` (a GPTModel chunk). Router layer_number is the
        1-based global layer, so MoE layer index = layer_number - 1 - first_k_dense."""
        decoder = getattr(model, "decoder", None)
        if decoder is None:
            return
        for module in decoder.modules():
            if isinstance(module, TopKRouter):
                # Count where the router runs: no device-to-host copy (and sync) in every forward.
                self.counts = self.counts.to(module.weight.device)
                index = module.layer_number - 1 - first_k_dense
                if not 0 <= index < self.counts.shape[0]:
                    raise ValueError(f"ExpertLoad: router of layer {module.layer_number} is not a MoE layer")
                self._hooks.append(module.register_forward_hook(self._hook(index)))

    def _hook(self, index: int):
        def hook(module, args, output) -> None:
            if torch.is_grad_enabled():
                self.observe(index, output[1])

        return hook

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def step(self, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """Global loads [L, E] of the step just taken (summed over `group`, default the world);
        folds them into `ema` and clears `counts`. Collective over `group`."""
        load = self.counts.clone()
        if dist.is_initialized():
            all_reduce_(load, group=group)  # on the backend's device, wherever the counts live
        load = load.cpu()
        self.ema = load.clone() if self.steps == 0 else self.decay * self.ema + (1.0 - self.decay) * load
        self.steps += 1
        self.counts.zero_()
        self.last = load
        return load

    def state_dict(self) -> dict:
        return {"ema": self.ema.tolist(), "steps": self.steps, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        ema = torch.tensor(state["ema"], dtype=torch.float64)
        if ema.shape != self.ema.shape:
            shapes = f"{tuple(ema.shape)}, model {tuple(self.ema.shape)}"
            raise ValueError(f"ExpertLoad: checkpoint loads have shape {shapes}")
        self.ema, self.steps, self.decay = ema, int(state["steps"]), float(state["decay"])
        self.counts.zero_()
