"""The MTP head during an RL step: off, or trained on the policy's own samples (rl.mtp_loss_coef).

Why train it at all: rollouts are drafted by the MTP head (rollout.speculative), and a head frozen at
its SFT weights drifts away from the policy it drafts for, so acceptance decays. Its loss on the
policy's own sampled tokens (megatron's MTP cross entropy, with the batch's loss mask) teaches it to
predict the policy's next-next token.

Why detach the trunk (rl.mtp_detach_trunk, default): that loss is an SFT term on the policy's own
samples; flowing into the trunk it would pull the policy toward its current samples, a change to the
RL objective. Detached, the MTP layer reads the trunk's hidden states, the shared embedding and the
shared output layer as constants: the trunk's gradients are exactly those of the GRPO loss, and only
the MTP head (its norms, eh_proj, transformer layer, final norm) learns.

How, without forking megatron (0.16.1): GPTModel._postprocess runs `self.mtp(hidden_states=...,
embedding=self.embedding)`, then calls `self.output_layer` once per MTP layer on the MTP hidden states
before the main call. The block gets detached inputs (the trunk rows of its output are put back with
their graph), and those first output_layer calls get a detached weight. tests/unit/test_rl_mtp.py
checks the trunk gradients bit-exact, so a change of that order upstream shows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel

from r1_megatron.model.provider import mtp_disabled


@contextlib.contextmanager
def rl_mtp(model: GPTModel, coef: float, detach_trunk: bool = True) -> Iterator[None]:
    """Within the block, `model`'s forward adds coef * the MTP loss (coef 0: MTP not run at all),
    with the trunk detached from it when detach_trunk."""
    if coef == 0 or model.config.mtp_num_layers is None:
        with mtp_disabled(model):
            yield
        return
    saved = model.config.mtp_loss_scaling_factor
    model.config.mtp_loss_scaling_factor = coef
    try:
        with _head_only(model) if detach_trunk else contextlib.nullcontext():
            yield
    finally:
        model.config.mtp_loss_scaling_factor = saved


@contextlib.contextmanager
def _head_only(model: GPTModel) -> Iterator[None]:
    """The MTP loss reaches the MTP head's parameters only (see the module doc)."""
    if not getattr(model, "mtp_process", False):  # a pipeline stage without the MTP block
        yield
        return
    block, output = model.mtp, model.output_layer
    block_forward, output_forward = block.forward, output.forward
    pending = [0]  # output_layer calls still to come for MTP hidden states in this forward

    def mtp_forward(*, hidden_states: torch.Tensor, embedding: Any, **kwargs: Any) -> torch.Tensor:
        def constant_embedding(**kw: Any) -> torch.Tensor:
            return embedding(**kw).detach()

        out = block_forward(hidden_states=hidden_states.detach(), embedding=constant_embedding, **kwargs)
        pending[0] = model.config.mtp_num_layers
        # The block returns [its input rows; one chunk per MTP layer]: the input rows keep their graph.
        return torch.cat([hidden_states, out[hidden_states.shape[0]:]], dim=0)

    def output_layer_forward(input_: torch.Tensor, weight: torch.Tensor | None = None, **kwargs: Any):
        if pending[0] == 0:
            return output_forward(input_, weight=weight, **kwargs)
        pending[0] -= 1
        weight = (output.weight if weight is None else weight).detach()
        fusion = output.gradient_accumulation_fusion  # the fused wgrad writes main_grad whatever the graph says
        output.gradient_accumulation_fusion = False
        try:
            return output_forward(input_, weight=weight, **kwargs)
        finally:
            output.gradient_accumulation_fusion = fusion

    block.forward, output.forward = mtp_forward, output_layer_forward
    try:
        yield
    finally:
        del block.forward, output.forward  # back to the class methods
