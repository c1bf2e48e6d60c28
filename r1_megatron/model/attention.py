"""Core attention and norm modules for the local (non transformer-engine) layer specs.

megatron-core's local DotProductAttention rejects MLA's separate k/v head dims (`k_channels`,
`v_channels`), and its torch norm asserts that sequence parallelism is off (TP > 1 with MoE needs it
on). These two modules fill those gaps through the layer spec; they are what the CPU path uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    """Causal softmax attention through `torch.nn.functional.scaled_dot_product_attention`.

    Shapes (per tensor-parallel rank, np = local query heads, ng = local kv heads):
      query [s, b, np, dk], key [s, b, ng, dk], value [s, b, ng, dv] -> output [s, b, np * dv].
      Packed (qkv_format "thd"): query [t, np, dk], key/value [t, ng, d*] -> output [t, np * dv];
      tokens attend only inside their own sequence (cu_seqlens_q).
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
            out = self._packed(q, k, v, packed_seq_params.cu_seqlens_q, dropout)
        else:
            mask = self._mask(q.shape[2], q.device, attention_mask, packed_seq_params if packed else None)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=self.softmax_scale
            )
        # [b, h, s, dv] -> [s, b, h * dv]
        out = out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)
        return out.squeeze(1) if packed else out

    def _packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                dropout: float) -> torch.Tensor:
        """Causal attention inside each packed sequence, one SDPA call per sequence ([1, h, t, d]).

        Same result as the block-diagonal mask, but each call takes torch's fused causal kernel and
        skips the cross-sequence blocks: ~3x faster forward and backward on CPU for rows of ~6
        sequences. Tokens past cu_seqlens[-1] (row padding) form one more sequence."""
        bounds = cu_seqlens.tolist()
        if bounds[-1] < q.shape[2]:
            bounds.append(q.shape[2])
        outs = [
            F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout_p=dropout,
                                           is_causal=True, scale=self.softmax_scale)
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a
        ]
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


class RMSNorm(torch.nn.RMSNorm):
    """RMSNorm over the last dim (weight [hidden]) built from megatron's norm arguments.

    Unlike megatron's WrappedTorchNorm it allows sequence parallelism: the weight is then marked
    `sequence_parallel`, so megatron's finalize_model_grads all-reduces its grad over the TP group.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
