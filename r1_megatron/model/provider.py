"""Build megatron-core's GPTModel from a model card.

DeepSeek-V3 cards give MLA + DeepSeekMoE (+ MTP); qwen2/llama cards give the dense GQA student. The
caller initializes torch.distributed and megatron's parallel_state first (see
r1_megatron/parallel/device.py); this module never decides how the model is split.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from r1_megatron.config.schema import ModelConfig, ParallelConfig
from r1_megatron.model.config import transformer_config
from r1_megatron.moe.redundant import use_redundant_layer
from r1_megatron.model.specs import decoder_block_spec, mtp_block_spec
from r1_megatron.parallel import compat_cpu
from r1_megatron.moe.replicas import mark_primaries, tie_replica_weights


def build_model(
    m: ModelConfig,
    parallel: ParallelConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    **config_overrides,
) -> GPTModel:
    """GPTModel for card `m` on `device`, holding this pipeline stage's layers.

    On CUDA the transformer-engine spec and fused kernels are used; elsewhere the local spec, after
    `compat_cpu.activate()`. `config_overrides` go to the TransformerConfig (e.g. recompute flags).
    """
    device = torch.device(device)
    gpu = device.type == "cuda"
    if not gpu:
        compat_cpu.activate()
    cfg = transformer_config(m, parallel, gpu=gpu, dtype=dtype, **config_overrides)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    block = decoder_block_spec(cfg, m, gpu, vp_stage=vp_stage)
    redundant = parallel is not None and parallel.redundant_experts > 0
    if redundant:  # R = E + redundant physical expert slots per MoE layer (moe/redundant.py)
        use_redundant_layer(block, m.num_experts + parallel.redundant_experts, m.first_k_dense)
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=block,
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=m.tie_embeddings,
        # MLA applies its own (YaRN) rope inside attention; the dense students use GPTModel's.
        position_embedding_type="none" if m.arch == "deepseek_v3" else "rope",
        rotary_base=m.rope_theta,
        mtp_block_spec=mtp_block_spec(cfg, m, gpu, vp_stage=vp_stage),
        vp_stage=vp_stage,
    ).to(device)
    if redundant:
        tie_replica_weights(model)  # replicas start as copies of their expert's first replica
        mark_primaries(model)  # before any optimizer is built: the grad norm counts each expert once
    return model


@contextlib.contextmanager
def mtp_disabled(model: GPTModel) -> Iterator[GPTModel]:
    """Run the main model only: megatron's MTP path needs labels, logits do not."""
    saved = model.mtp_process, model.config.mtp_num_layers
    model.mtp_process, model.config.mtp_num_layers = False, None
    try:
        yield model
    finally:
        model.mtp_process, model.config.mtp_num_layers = saved


def forward_logits(
    model: GPTModel, tokens: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [b, s, vocab] of the main model (no MTP) for token ids [b, s] (single pipeline stage)."""
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    with mtp_disabled(model):
        return model(tokens, position_ids, None)
