"""Core attention and norm modules for the local (non transformer-engine) layer specs.

megatron-core's local DotProductAttention rejects MLA's separate k/v head dims (`k_channels`,
`v_channels`), and its torch norm asserts that sequence parallelism is off (TP > 1 with MoE needs it
on). These two modules fill those gaps through the layer spec; they are what the CPU path uses.

Shared prefixes (`SharedPrefixParams`): a packed stream in which a sequence may continue a prefix
segment that several sequences share, e.g. a GRPO group's prompt packed once with its G responses.
SDPAttention lets such a sequence attend to its prefix segment, and PositionedMLA gives its tokens
the rope positions that follow the prefix (megatron's thd rope restarts at each segment otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass
class SharedPrefixParams(PackedSeqParams):
    """thd packing where segment i (between cu_seqlens_q[i] and [i + 1]) also attends, in full, to
    segment prefix_of[i] (-1: to none). positions [t] (long) holds each token's rope position; a
    segment that continues a prefix of n tokens starts at position n. Only the local spec honors these
    fields (SDPAttention, PositionedMLA); megatron's own modules read the plain PackedSeqParams."""

    prefix_of: torch.Tensor | None = None
    positions: torch.Tensor | None = None


class SDPAttention(MegatronModule):
    """Causal softmax attention through `torch.nn.functional.scaled_dot_product_attention`.

    Shapes (per tensor-parallel rank, np = local query heads, ng = local kv heads):
      query [s, b, np, dk], key [s, b, ng, dk], value [s, b, ng, dv] -> output [s, b, np * dv].
      Packed (qkv_format "thd"): query [t, np, dk], key/value [t, ng, d*] -> output [t, np * dv];
      tokens attend only inside their own sequence (cu_seqlens_q), plus its prefix segment when
      packed_seq_params is a SharedPrefixParams.
    GQA (ng < np) repeats each kv head for its np/ng query heads. MLA passes dk != dv.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism (context_parallel_size > 1)")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention_bias")
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout = self.dropout_p if self.training else 0.0
        if packed and attention_mask is None:
            prefix_of = getattr(packed_seq_params, "prefix_of", None)
            out = self._packed(q, k, v, packed_seq_params.cu_seqlens_q, dropout, prefix_of)
        else:
            mask = self._mask(q.shape[2], q.device, attention_mask, packed_seq_params if packed else None)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=self.softmax_scale
            )
        # [b, h, s, dv] -> [s, b, h * dv]
        out = out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)
        return out.squeeze(1) if packed else out

    def _packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                dropout: float, prefix_of: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention inside each packed sequence, one SDPA call per sequence ([1, h, t, d]).

        Same result as the block-diagonal mask, but each call takes torch's fused causal kernel and
        skips the cross-sequence blocks: ~3x faster forward and backward on CPU for rows of ~6
        sequences. Tokens past cu_seqlens[-1] (row padding) form one more sequence. A sequence with
        a prefix segment (prefix_of) sees all of it before its own tokens, causally."""
        bounds = cu_seqlens.tolist()
        if bounds[-1] < q.shape[2]:
            bounds.append(q.shape[2])
        prefixes = [-1] * (len(bounds) - 1) if prefix_of is None else prefix_of.tolist()
        if len(prefixes) < len(bounds) - 1:  # the row-padding sequence added above
            prefixes.append(-1)
        outs = []
        for (a, b), p in zip(zip(bounds[:-1], bounds[1:]), prefixes, strict=True):
            if b <= a:
                continue
            if p < 0:
                outs.append(F.scaled_dot_product_attention(
                    q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout_p=dropout, is_causal=True,
                    scale=self.softmax_scale))
                continue
            pa, pb = bounds[p], bounds[p + 1]
            if not pb <= a:
                raise ValueError(f"packed segment {a}:{b}: its prefix segment {p} does not come before it")
            keys, values = (torch.cat([x[:, :, pa:pb], x[:, :, a:b]], dim=2) for x in (k, v))
            # Query j sees the whole prefix and its own tokens up to j (causal, aligned bottom right).
            allowed = torch.ones(b - a, keys.shape[2], dtype=torch.bool, device=q.device).tril(pb - pa)
            outs.append(F.scaled_dot_product_attention(
                q[:, :, a:b], keys, values, attn_mask=allowed, dropout_p=dropout, scale=self.softmax_scale))
        return torch.cat(outs, dim=2)

    @staticmethod
    def _mask(
        seq_len: int,
        device: torch.device,
        attention_mask: torch.Tensor | None,
        packed_seq_params: PackedSeqParams | None,
    ) -> torch.Tensor | None:
        """A boolean "may attend" mask, or None for plain causal attention."""
        if packed_seq_params is None and attention_mask is None:
            return None
        allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
        if packed_seq_params is not None:
            bounds = packed_seq_params.cu_seqlens_q.to(device)
            seq_id = torch.bucketize(torch.arange(seq_len, device=device), bounds[1:], right=True)
            allowed = allowed & (seq_id[:, None] == seq_id[None, :])
        if attention_mask is not None:
            # megatron's convention: True marks a masked-out position; [b, 1, s, s] or broadcastable.
            allowed = allowed & ~attention_mask.bool()
        return allowed


class PositionedMLA(MLASelfAttention):
    """megatron's MLA whose rope reads per-token positions from SharedPrefixParams.positions.

    megatron's thd rope has an exact-position mode: given rope frequencies with one row per packed
    token (as many as cu_seqlens[-1]), token i gets row i. With shared prefixes the rotary module
    is swapped, for this call only, for one that returns the table at `positions`; MLA's own code
    runs unchanged. Without positions this is MLASelfAttention exactly."""

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, position_ids=None,
                                    packed_seq_params=None, *args, **kwargs):
        positions = getattr(packed_seq_params, "positions", None)
        if positions is None:
            return super().get_query_key_value_tensors(
                hidden_states, key_value_states, position_ids, packed_seq_params, *args, **kwargs)
        if int(packed_seq_params.cu_seqlens_q[-1]) != positions.numel():
            raise ValueError(f"SharedPrefixParams: {positions.numel()} positions for a stream of "
                             f"{int(packed_seq_params.cu_seqlens_q[-1])} tokens")
        table = self.rotary_pos_emb
        self._modules["rotary_pos_emb"] = _RopeAt(table, positions)
        try:
            return super().get_query_key_value_tensors(
                hidden_states, key_value_states, position_ids, packed_seq_params, *args, **kwargs)
        finally:
            self._modules["rotary_pos_emb"] = table


class _RopeAt(torch.nn.Module):
    """A rotary module's table, read at given token positions (one row per token)."""

    def __init__(self, table: torch.nn.Module, positions: torch.Tensor) -> None:
        super().__init__()
        self.table, self.positions = table, positions

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.positions.numel()

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, **kwargs):
        out = self.table(int(self.positions.max()) + 1, offset, packed_seq, **kwargs)
        index = self.positions.to(device=(out[0] if isinstance(out, tuple) else out).device, dtype=torch.long)
        if isinstance(out, tuple):  # YaRN: (emb, mscale)
            return (out[0][index], *out[1:])
        return out[index]


def supports_shared_prefix(model: torch.nn.Module) -> bool:
    """Whether every attention layer of `model` honors SharedPrefixParams (the local spec's MLA)."""
    layers = [m for m in model.modules() if isinstance(m, MLASelfAttention)]
    return bool(layers) and all(
        isinstance(m, PositionedMLA) and isinstance(m.core_attention, SDPAttention) for m in layers)


class RMSNorm(torch.nn.RMSNorm):
    """RMSNorm over the last dim (weight [hidden]) built from megatron's norm arguments.

    Unlike megatron's WrappedTorchNorm it allows sequence parallelism: the weight is then marked
    `sequence_parallel`, so megatron's finalize_model_grads all-reduces its grad over the TP group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
