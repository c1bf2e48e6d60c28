"""The rollout engine interface: what the GRPO loop asks of any generator (docs/architecture.md#interfaces).

Four verbs carry a step: `generate` (or `generate_stream`) samples G responses per prompt with the
logprob of every sampled token, `update_weights` takes the trainer's weights as a stream of (HF name,
full tensor), `release` frees the device for the trainer and `resume` takes it back. `logprobs` scores fixed
token sequences (teacher forcing); the refit canary uses it to compare against the trainer.

Prompts and responses are token ids: tokenization and the chat template live in `data/`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from r1_megatron.config.schema import RolloutConfig


class RolloutError(RuntimeError):
    """The engine failed during `phase` (startup, generate, logprobs, update_weights, release, resume).

    The engine that raised it is marked dead and rebuilt on its next use.
    """

    def __init__(self, phase: str, message: str):
        self.phase = phase
        super().__init__(f"rollout engine failed during {phase}: {message}")


@dataclass(frozen=True)
class SamplingParams:
    """How `generate` samples. temperature 0 is greedy; seed None draws fresh randomness each call."""

    temperature: float = 1.0  # softmax temperature (0: greedy)
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    max_tokens: int = 64  # response length cap; a sample that hits it is `truncated`
    stop_on_eos: bool = True  # end a sample at the model's EOS token (kept in the response)
    seed: int | None = 0  # base seed; each (call, prompt) derives its own so groups differ

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens must be >= 1, got {self.max_tokens}")

    @classmethod
    def from_config(cls, cfg: RolloutConfig) -> SamplingParams:
        return cls(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=cfg.seed)


@dataclass
class GenSample:
    """One sampled response: R token ids and the engine's logprob of each ([R] floats, natural log).

    The logprobs are of the sampled token under the model's raw distribution (before temperature
    and top-p), i.e. log pi_vllm(o_t | q, o_<t), which is what the GRPO mismatch and TIS terms use.
    finish_reason is "stop" (EOS) or "length" (hit max_tokens).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    routed_experts: Any = None  # [P + R - 1, moe_layers, topk] logical ids (rollout/routing_capture.py), or None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class RolloutEngine(abc.ABC):
    """A generator that can swap in new weights between steps.

    `weights_version` counts the refits the engine holds: 0 is the checkpoint it was built from.
    """

    weights_version: int = 0
    # Seconds per part of the last update_weights, for engines that measure them (the refit log and
    # bench/refit.py show them). Engines assign a new dict; this shared default stays empty.
    refit_split: dict[str, float] = {}  # noqa: RUF012

    @property
    def holds_weights(self) -> bool:
        """Whether generate() may run: False for an engine built with dummy weights, until its first refit."""
        return True

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams,
                 keys: list[int] | None = None) -> list[list[GenSample]]:
        """n samples for each prompt: result[i][j] is sample j of prompt i.

        keys[i] names prompt i (its index in the prompt stream): with a sampling seed, sample j of
        prompt i depends only on (seed, keys[i], j), not on which engine or batch generates it."""

    def generate_stream(
        self, prompts: list[list[int]], n: int, sampling: SamplingParams, keys: list[int] | None = None
    ) -> Iterator[tuple[int, list[GenSample]]]:
        """(i, the n samples of prompt i) in the order the groups finish, so that scoring can start
        before the last group is done. Default: every group at the end of `generate`."""
        yield from enumerate(self.generate(prompts, n, sampling, keys))

    @abc.abstractmethod
    def logprobs(self, token_ids: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced logprobs: result[i] is float32 [len(token_ids[i]) - 1], entry t being
        log p(token_ids[i][t + 1] | token_ids[i][: t + 1])."""

    @abc.abstractmethod
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> None:
        """Load a full set of HF-named weights in place; `version` (default: current + 1) is recorded."""

    @abc.abstractmethod
    def release(self) -> None:
        """Free the device memory the engine holds (weights and KV cache) for the trainer."""

    @abc.abstractmethod
    def resume(self) -> None:
        """Take back whatever `release` freed and `update_weights` did not already restore."""

    def close(self) -> None:
        """Drop the engine for good (default: nothing to free)."""


def prompt_keys(keys: list[int] | list[str] | None, call: int, count: int) -> list[str]:
    """The key each prompt's seeds derive from: the caller's (a prompt's index in its stream), else
    (call number, position) so repeated prompts and repeated calls still get different samples."""
    if keys is None:
        return [f"call{call}:{i}" for i in range(count)]
    if len(keys) != count:
        raise ValueError(f"generate: {len(keys)} keys for {count} prompts")
    return [str(k) for k in keys]


def in_prompt_order(stream: Iterator[tuple[int, list[GenSample]]], count: int) -> list[list[GenSample]]:
    """`generate`'s result from a `generate_stream`: the groups of `count` prompts, in prompt order."""
    out: list[list[GenSample]] = [[] for _ in range(count)]
    for i, samples in stream:
        out[i] = samples
    return out
