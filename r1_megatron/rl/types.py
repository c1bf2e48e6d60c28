"""The contract between rollout, reward and training: `Sample`, `RolloutBatch`, `LossNorm`.

Rollout fills the token ids and the vLLM sampling logprobs, reward fills `reward`,
`reward_components` and `reward_error`, `rl/advantages.py` fills `advantage` (and may zero
`loss_mask`), and training reads the rest as tensors through `sequence_tensors` (one sequence,
the building block of padded and packed layouts) or `RolloutBatch.to_padded`.

Label alignment (the convention every per-token tensor here follows): position t of a sequence
holds input token `tokens[t]` and predicts `labels[t] = tokens[t + 1]`, so the logprob of response
token j, which sits at input position P + j (P = prompt length), is read at position P + j - 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Sample:
    """One sampled response. Per-token lists have one entry per response token (length R)."""

    prompt_ids: list[int]  # [P] prompt token ids (chat template applied)
    response_ids: list[int]  # [R] sampled token ids
    rollout_logprobs: list[float]  # [R] vLLM's logprob of each sampled token
    group_id: int  # which prompt this response answers; a group is the G responses to one prompt
    sample_index: int  # position inside its group (0..G-1)
    reward: float = 0.0  # total reward sum_k w_k * r_k (before any overlong or KL shaping)
    reward_components: dict[str, float] = field(default_factory=dict)  # named sub-rewards
    reward_error: str | None = None  # type of the scoring failure, if any (never a silent 0)
    truncated: bool = False  # generation stopped at max_response_len, not at EOS
    ground_truth: Any = None  # answer, test cases or language tag the reward compares against
    prompt_text: str = ""  # decoded prompt (for logs and reward functions)
    response_text: str = ""  # decoded response (what the reward functions read)
    advantage: float = 0.0  # A_i, shared by every response token
    loss_mask: list[float] = field(default_factory=list)  # [R] 1 = token enters the loss; [] means all 1
    policy_version: int = 0  # GRPO steps the weights that sampled it had taken (staleness, rl/async_rollout.py)
    # Router replay (rl/router_replay.py): vLLM's logical expert ids per input position (prompt and
    # response; the last response token is never fed back, so P + R - 1 rows), per MoE layer (dense
    # layers carry none), uint8 [P + R - 1, moe_layers, topk] (int16 above 256 experts). None: not captured.
    routed_experts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        if len(self.rollout_logprobs) != n:
            raise ValueError(
                f"Sample(group {self.group_id}, index {self.sample_index}): rollout_logprobs has "
                f"{len(self.rollout_logprobs)} entries, response_ids has {n}"
            )
        if not self.loss_mask:
            self.loss_mask = [1.0] * n
        elif len(self.loss_mask) != n:
            raise ValueError(
                f"Sample(group {self.group_id}, index {self.sample_index}): loss_mask has "
                f"{len(self.loss_mask)} entries, response_ids has {n}"
            )

    @property
    def response_len(self) -> int:
        return len(self.response_ids)

    @property
    def num_loss_tokens(self) -> int:
        return int(sum(1 for m in self.loss_mask if m > 0))


@dataclass
class LossNorm:
    """Global normalizers of one optimizer step (all microbatches of all DP ranks together).

    num_tokens: response tokens with loss_mask > 0; num_sequences: sequences with at least one
    such token; max_response_len: the Dr. GRPO constant (usually rollout.max_new_tokens).
    """

    num_tokens: int
    num_sequences: int
    max_response_len: int


@dataclass
class SequenceTensors:
    """One sequence of length S = P + R, label-aligned (see module docstring). All 1-D [S].

    token_seq_len holds, at every position, the number of loss tokens of this sequence, so
    per-sequence means can be taken token by token in any layout (padded or packed).
    """

    tokens: torch.Tensor  # long
    labels: torch.Tensor  # long, tokens shifted left by one, pad at the end
    loss_mask: torch.Tensor  # float
    advantages: torch.Tensor  # float
    rollout_logprobs: torch.Tensor  # float
    token_seq_len: torch.Tensor  # float
    # float: the sample's key (rl/router_replay.py sample_key), so a packed position finds its sample
    sample_key: torch.Tensor | None = None


def sequence_tensors(sample: Sample, pad_id: int = 0, dtype: torch.dtype = torch.float32) -> SequenceTensors:
    """The label-aligned per-position tensors of one sample (padded and packed rows concatenate these)."""
    p, r = len(sample.prompt_ids), sample.response_len
    if p == 0:
        raise ValueError(f"Sample(group {sample.group_id}, index {sample.sample_index}): empty prompt_ids")
    tokens = torch.tensor(sample.prompt_ids + sample.response_ids, dtype=torch.long)
    labels = torch.full_like(tokens, pad_id)
    labels[:-1] = tokens[1:]
    # Response token j is predicted at position p - 1 + j.
    resp = slice(p - 1, p - 1 + r)
    loss_mask = torch.zeros(p + r, dtype=dtype)
    loss_mask[resp] = torch.tensor(sample.loss_mask, dtype=dtype)
    advantages = torch.zeros(p + r, dtype=dtype)
    advantages[resp] = sample.advantage
    rollout_logprobs = torch.zeros(p + r, dtype=dtype)
    rollout_logprobs[resp] = torch.tensor(sample.rollout_logprobs, dtype=dtype)
    token_seq_len = torch.full((p + r,), float(sample.num_loss_tokens), dtype=dtype)
    key = torch.full((p + r,), float(sample_key(sample)), dtype=dtype)
    return SequenceTensors(tokens, labels, loss_mask, advantages, rollout_logprobs, token_seq_len, key)


# Groups and samples a sample key can tell apart; keys stay below 2**24, exact in float32 extras.
_KEY_STRIDE = 4096


def sample_key(sample: Sample) -> int:
    """1 + group_id * 4096 + sample_index: which sample a packed position belongs to; 0 (none) when
    group_id >= 4095 or sample_index >= 4096 (router replay then refuses, rl/router_replay.py)."""
    if not (0 <= sample.group_id < _KEY_STRIDE - 1 and 0 <= sample.sample_index < _KEY_STRIDE):
        return 0
    return 1 + sample.group_id * _KEY_STRIDE + sample.sample_index


@dataclass
class PaddedBatch:
    """Right-padded [B, T] tensors of full sequences (prompt + response), row b = samples[b].

    Fields are those of SequenceTensors stacked to [B, T], plus attention_mask [B, T] (bool, real
    tokens), position_ids [B, T] (long) and seq_index [B] (long, index into RolloutBatch.samples).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    rollout_logprobs: torch.Tensor
    token_seq_len: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    seq_index: torch.Tensor


@dataclass
class RolloutBatch:
    """The samples of one GRPO step. Groups are identified by `Sample.group_id`."""

    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    def groups(self) -> list[list[Sample]]:
        """Samples grouped by group_id (groups in id order), each sorted by sample_index."""
        by_id: dict[int, list[Sample]] = {}
        for s in self.samples:
            by_id.setdefault(s.group_id, []).append(s)
        return [sorted(by_id[k], key=lambda s: s.sample_index) for k in sorted(by_id)]

    def group_index(self) -> torch.Tensor:
        """[num_groups, G] long: indices into `samples`, laid out like `groups()`.

        Raises when the groups have different sizes (advantages need a rectangular layout).
        """
        pos = {id(s): i for i, s in enumerate(self.samples)}
        groups = self.groups()
        sizes = sorted({len(g) for g in groups})
        if len(sizes) > 1:
            raise ValueError(f"RolloutBatch: groups have unequal sizes {sizes}; every prompt needs G samples")
        return torch.tensor([[pos[id(s)] for s in g] for g in groups], dtype=torch.long)

    def rewards(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N] rewards in `samples` order."""
        return torch.tensor([s.reward for s in self.samples], dtype=dtype)

    def response_lengths(self) -> torch.Tensor:
        """[N] long response lengths in `samples` order."""
        return torch.tensor([s.response_len for s in self.samples], dtype=torch.long)

    def truncated(self) -> torch.Tensor:
        """[N] bool in `samples` order."""
        return torch.tensor([s.truncated for s in self.samples], dtype=torch.bool)

    @property
    def num_response_tokens(self) -> int:
        return sum(s.response_len for s in self.samples)

    @property
    def num_loss_tokens(self) -> int:
        return sum(s.num_loss_tokens for s in self.samples)

    @property
    def num_loss_sequences(self) -> int:
        return sum(1 for s in self.samples if s.num_loss_tokens > 0)

    def loss_norm(self, max_response_len: int | None = None) -> LossNorm:
        """Normalizers for a step over exactly these samples (None: the longest response here)."""
        if max_response_len is None:
            max_response_len = max((s.response_len for s in self.samples), default=0)
        return LossNorm(self.num_loss_tokens, self.num_loss_sequences, max_response_len)

    def select_groups(self, keep: Sequence[bool]) -> RolloutBatch:
        """A batch of the groups with keep[g] true (g indexes `groups()`), e.g. for dynamic sampling."""
        groups = self.groups()
        if len(keep) != len(groups):
            raise ValueError(f"select_groups: keep has {len(keep)} entries for {len(groups)} groups")
        return RolloutBatch([s for g, k in zip(groups, keep, strict=True) if k for s in g])

    def to_padded(
        self, pad_id: int = 0, length: int | None = None, dtype: torch.dtype = torch.float32
    ) -> PaddedBatch:
        """[B, T] tensors, T = `length` or the longest prompt + response here."""
        seqs = [sequence_tensors(s, pad_id, dtype) for s in self.samples]
        longest = max((len(q.tokens) for q in seqs), default=0)
        t = longest if length is None else length
        if t < longest:
            raise ValueError(f"to_padded: length {t} is shorter than the longest sequence ({longest})")

        def stack(name: str, fill: float | int) -> torch.Tensor:
            rows = [getattr(q, name) for q in seqs]
            out = torch.full((len(rows), t), fill, dtype=rows[0].dtype if rows else dtype)
            for b, row in enumerate(rows):
                out[b, : len(row)] = row
            return out

        lens = torch.tensor([len(q.tokens) for q in seqs], dtype=torch.long)
        positions = torch.arange(t).expand(len(seqs), t)
        return PaddedBatch(
            tokens=stack("tokens", pad_id),
            labels=stack("labels", pad_id),
            loss_mask=stack("loss_mask", 0.0),
            advantages=stack("advantages", 0.0),
            rollout_logprobs=stack("rollout_logprobs", 0.0),
            # 1 on padding so a division by it stays finite; the loss mask zeroes those positions.
            token_seq_len=stack("token_seq_len", 1.0),
            attention_mask=positions < lens[:, None],
            position_ids=positions.clone(),
            seq_index=torch.arange(len(seqs), dtype=torch.long),
        )
