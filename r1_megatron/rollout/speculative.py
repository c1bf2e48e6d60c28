"""Self-speculative rollout with the model's MTP head as the drafter (`rollout.speculative`).

vLLM 0.32 names the method "mtp" (the older "deepseek_mtp" is an alias it rewrites): the drafter is
the checkpoint's own MTP layer(s) (`model.layers.{num_layers + k}.*`), sharing the target's embedding
and LM head. Rejection sampling keeps the target's distribution exactly; speculation changes only
the speed, which on CPU needs `vllm_cpu_compat.patch_speculative_sampling` and
`patch_moe_routing` (see there).

Acceptance is read from vLLM's own spec-decode counters (Prometheus, through `LLM.get_metrics`; the
engine turns stats logging on when speculating). They are process-wide running totals, so a step's
figures are the difference of two snapshots.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from r1_megatron.config.schema import SpeculativeConfig

_COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
}
_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def vllm_config(cfg: SpeculativeConfig) -> dict[str, Any]:
    """The `speculative_config` for `vllm.LLM` (method "mtp" of vLLM 0.32)."""
    return {"method": cfg.method, "num_speculative_tokens": cfg.num_speculative_tokens}


# The MTP layer's own tensors (DeepSeek-V3 HF layout): everything under model.layers.{L}. except the
# copies of the embedding and LM head, which vLLM's drafter shares with the target model.
_SHARED = re.compile(r"\.(embed_tokens|shared_head\.head)\.weight$")


def drafter_model(runner: Any) -> Any:
    """The vLLM worker's MTP drafter model (an nn.Module), or None when not speculating."""
    return getattr(getattr(runner, "drafter", None), "model", None)


def drafter_weight_filter(names: set[str]) -> Callable[[str], bool]:
    """Whether a checkpoint tensor name is one the drafter owns: under an MTP layer (the layers with an
    `eh_proj`), not one of its copies of the shared embedding / head."""
    prefixes = tuple(n[: -len("eh_proj.weight")] for n in names if n.endswith(".eh_proj.weight"))
    return lambda name: name.startswith(prefixes) and not _SHARED.search(name)


def tee_drafter_weights(
    runner: Any, weights: Iterable[tuple[str, Any]]
) -> tuple[Iterable[tuple[str, Any]], list[tuple[str, Any]]]:
    """For vLLM's full reload (which covers the target model only): the stream passed through, and a
    list that collects copies of the MTP layers' tensors as it goes (stays empty without a drafter)."""
    kept: list[tuple[str, Any]] = []
    if drafter_model(runner) is None:
        return weights, kept
    hf_config = runner.model_config.hf_config
    first = hf_config.num_hidden_layers
    layers = tuple(f"model.layers.{i}." for i in range(first, first + hf_config.num_nextn_predict_layers))

    def tee() -> Iterator[tuple[str, Any]]:
        for name, tensor in weights:
            if name.startswith(layers):
                kept.append((name, tensor.clone()))
            yield name, tensor

    return tee(), kept


def reload_drafter(runner: Any, kept: list[tuple[str, Any]]) -> list[Any]:
    """Reload the drafter in place from `kept` (its copies of the shared embedding and head included,
    equal to the target's) the way vLLM reloads the target; returns [the drafter] or []. Not run
    here: on CPU refits take the fast path, and the CUDA path has no GPU to run on."""
    drafter = drafter_model(runner)
    if drafter is None:
        return []
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    reload_weights(runner.vllm_config, drafter, iter(kept), None, True)
    return [drafter]


@dataclass
class SpecCounts:
    """vLLM's spec-decode totals at one moment (summed over engines/labels)."""

    drafts: int = 0  # verification steps that carried drafts
    draft_tokens: int = 0  # tokens proposed
    accepted_tokens: int = 0  # tokens accepted
    per_pos: list[int] = field(default_factory=list)  # accepted at draft position 0, 1, ...

    @classmethod
    def read(cls, llm: Any) -> SpecCounts:
        out = cls()
        for metric in llm.get_metrics():
            if metric.name in _COUNTERS:
                key = _COUNTERS[metric.name]
                setattr(out, key, getattr(out, key) + int(metric.value))
            elif metric.name == _PER_POS:
                values = [int(v) for v in metric.values]
                out.per_pos = [a + b for a, b in zip(out.per_pos + [0] * len(values), values)]
        return out

    def minus(self, before: SpecCounts) -> SpecCounts:
        pos = [a - (before.per_pos[i] if i < len(before.per_pos) else 0) for i, a in enumerate(self.per_pos)]
        return SpecCounts(
            self.drafts - before.drafts,
            self.draft_tokens - before.draft_tokens,
            self.accepted_tokens - before.accepted_tokens,
            pos,
        )

    def metrics(self, prefix: str = "rollout/spec_") -> dict[str, float]:
        """Acceptance overall and per draft position, and tokens accepted per verification step
        (an emitted token per step comes on top: the target's own)."""
        if not self.drafts:
            return {}
        out = {
            f"{prefix}acceptance": self.accepted_tokens / max(self.draft_tokens, 1),
            f"{prefix}accepted_per_step": self.accepted_tokens / self.drafts,
            f"{prefix}draft_tokens": float(self.draft_tokens),
        }
        for i, n in enumerate(self.per_pos):
            out[f"{prefix}acceptance_pos{i}"] = n / self.drafts
        return out


def trainer_mean_logprob(model: Any, prompts: list[list[int]], groups: list[list[Any]]) -> float:
    """The trainer's mean log p(token) over every sampled token of `groups` (GenSamples per prompt,
    equal lengths within a group), from `model`'s main head (megatron GPTModel, one stage): how a
    speculative run's distribution is compared with a plain run's (the drafter must not change it)."""
    import torch

    from r1_megatron.model.provider import forward_logits

    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, samples in zip(prompts, groups, strict=True):
            seqs = torch.tensor([prompt + s.token_ids for s in samples])
            logp = forward_logits(model, seqs).float().log_softmax(-1)[:, len(prompt) - 1 : -1]
            picked = logp.gather(-1, seqs[:, len(prompt) :, None])
            total, count = total + float(picked.sum()), count + picked.numel()
    return total / count


class GenerateMeter:
    """Tokens/s of one generate call and, given the speculating `llm`, its spec-decode figures."""

    def __init__(self, llm: Any | None) -> None:
        self.llm, self.start, self.tokens = llm, time.perf_counter(), 0
        self.before = SpecCounts.read(llm) if llm is not None else None

    def add(self, samples: Iterable[Any]) -> None:
        self.tokens += sum(len(s.token_ids) for s in samples)

    def stats(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        out = {"rollout/tokens_per_s": self.tokens / seconds if seconds > 0 else 0.0}
        if self.before is not None:
            out.update(SpecCounts.read(self.llm).minus(self.before).metrics())
        return out
