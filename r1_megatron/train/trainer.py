"""The trainer: one pipeline stage's model chunk under megatron DDP, its optimizer and schedule.

Every later stage trains through `Trainer.train_step(microbatches, loss_fn)` (SFT, GRPO,
distillation) and reads logprobs through `Trainer.forward_logprobs(microbatches)`.

Loss contract. The model's forward returns, per token, the log-probability of its label (fp32,
computed vocab-parallel: minus megatron's per-token cross entropy). `loss_fn(logprobs, mb)` returns
`(loss, sums)`: this microbatch's share of the step objective, already normalized by *global*
counts (rl/losses.py `LossNorm`), and a dict of additive metric tensors. The step objective is then
the plain sum of microbatch losses over microbatches and DP ranks. Megatron would average instead
(its schedule divides each microbatch loss by num_microbatches and DDP scales grads by 1/dp), so
the loss handed to megatron is multiplied by num_microbatches * dp; what it then does turns that
back into the sum. With `train_step(..., entropy=True)` the loss_fn is called as
`loss_fn(logprobs, mb, entropy=H)`, H the per-token policy entropy [b, s] (fp32, differentiable) from
the same forward's vocab-parallel logits (train/entropy.py).

The MTP loss and the MoE sequence aux loss stay megatron's own: each microbatch contributes its
token-mean MTP loss (times mtp_loss_scale) and its aux loss, divided by num_microbatches, and DDP
averages them over DP. With the same global set of microbatches this is the mean over all global
microbatches, whatever the layout. Megatron computes the seq aux loss per *row*, so for a packed
stream the "sequence" is the whole stream (a departure from DeepSeek-V3, which takes each sequence).
The aux-loss-free expert-bias update runs in megatron's finalize_model_grads, with token counts
summed over the whole TP x DP batch.

Precision (model/precision.py): fp32, or bf16 weights under Float16Module with fp32 main weights,
grads and Adam moments; the loss, logprobs and metrics are fp32 either way. Before the optimizer
writes anything, the non-finite guard (train/nonfinite.py) checks the loss terms and the global grad
norm and skips the whole update on every rank when either is not finite.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import optimizer as megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import unwrap_model

from r1_megatron.config.schema import JobConfig, ParallelConfig
from r1_megatron.model import precision
from r1_megatron.model.attention import SharedPrefixParams
from r1_megatron.model.provider import build_model, mtp_disabled
from r1_megatron.moe.replicas import ReplicaManager
from r1_megatron.train.entropy import capture_entropy
from r1_megatron.train.nonfinite import OBJECTIVE, StepGuard
from r1_megatron.train.layout import stage_overrides
from r1_megatron.train.microbatch import Microbatch
from r1_megatron.train.step_sums import aux_metrics, clear_loss_trackers, reduce_sums

LossFn = Callable[[torch.Tensor, Microbatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Trainer:
    """This rank's model chunk (megatron DDP), optimizer (Adam) and LR schedule.

    With for_training=False only the model chunk is built, forward-only (forward_logprobs, export,
    the GRPO reference): no DDP grad buffers, no optimizer, no schedule. Construct after
    `parallel.groups.init_process_groups`. `model` is a list of model chunks (one: no virtual
    pipeline; under Float16Module in bf16, model/precision.py), `optimizer` megatron's (chained:
    dense + expert params), `scheduler` the OptimizerParamScheduler. `step` counts optimizer steps
    taken (a step skipped by the non-finite guard, train/nonfinite.py, is not one).
    """

    def __init__(
        self, cfg: JobConfig, layout: ParallelConfig, device: torch.device, *, for_training: bool = True
    ) -> None:
        self.cfg, self.layout, self.device = cfg, layout, device
        self.step = 0
        self.replicas: ReplicaManager | None = None
        self.precision = precision.select(cfg, device)
        module = build_model(
            cfg.model, layout, device=device, dtype=self.precision.dtype,
            **stage_overrides(cfg, layout, gpu=device.type == "cuda"),
        )
        self.config = module.config
        module = precision.wrap(module, self.precision)
        if not for_training:
            self.model, self.optimizer, self.scheduler, self.guard = [module], None, None, None
            return
        ddp_config = DistributedDataParallelConfig(
            overlap_grad_reduce=False,
            # DDP's own check raises on the first NaN; the step guard skips the update instead.
            check_for_nan_in_grad=False,
            **precision.ddp_kwargs(self.precision),
        )
        self.model = [DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=module)]
        self.config.no_sync_func = self.model[0].no_sync
        self.config.finalize_model_grads_func = finalize_model_grads
        o = cfg.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.clip_grad,
                **precision.optimizer_kwargs(self.precision),
            ),
            self.model,
        )
        self.guard = StepGuard(self.unwrapped, o.max_bad_steps, enabled=o.skip_nonfinite)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=max(o.total_steps, 1),
            lr_decay_style=o.decay_style,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=max(o.total_steps, 1),
            wd_incr_style="constant",
        )
        # Expert load statistics; with redundant experts also replica grad sync and rebalancing
        # (needs the model, the optimizer and config.finalize_model_grads_func, so it comes last).
        if cfg.model.num_experts:
            self.replicas = ReplicaManager(self, layout.rebalance_every).attach()

    # ------------------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> torch.nn.Module:
        """The GPTModel of this stage (under DDP when training, under Float16Module in bf16)."""
        return unwrap_model(self.model[0])

    @property
    def dp_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def dp_sum(self, value: float | torch.Tensor) -> torch.Tensor:
        """Sum a number over the data-parallel ranks (e.g. loss tokens, for global normalizers)."""
        t = torch.as_tensor(value, dtype=torch.float64).reshape(1).to(self.device, copy=True)
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
        return t[0]

    # ------------------------------------------------------------------------------------------
    def _prepare(self, microbatches: Sequence[Microbatch]) -> tuple[list[Microbatch], int, int]:
        """Pad every microbatch to one length (a multiple of tp under sequence parallelism); move
        them to the device. Returns (microbatches, seq_length, micro_batch_size)."""
        if not microbatches:
            raise ValueError("train_step/forward_logprobs: no microbatches for this rank")
        rows = {mb.shape[0] for mb in microbatches}
        if len(rows) > 1:
            raise ValueError(f"microbatches have different row counts {sorted(rows)}; megatron needs one")
        length = max(mb.shape[1] for mb in microbatches)
        if self.layout.sequence_parallel:
            length = -(-length // self.layout.tp) * self.layout.tp
        return [mb.padded_to(length).to(self.device) for mb in microbatches], length, rows.pop()

    def _forward_step(self, loss_wrapper: Callable, with_entropy: bool, data_iterator, model):
        mb: Microbatch = next(data_iterator)
        packed = None
        if mb.cu_seqlens is not None:
            cu = mb.cu_seqlens.to(torch.int32)
            longest = int((cu[1:] - cu[:-1]).max())
            shared = {} if mb.segment_prefix is None else {
                "prefix_of": mb.segment_prefix, "positions": mb.position_ids.reshape(-1)}
            packed = (SharedPrefixParams if shared else PackedSeqParams)(
                qkv_format="thd",
                cu_seqlens_q=cu,
                cu_seqlens_kv=cu,
                max_seqlen_q=longest,
                max_seqlen_kv=longest,
                **shared,
            )
        unwrapped = unwrap_model(model)  # the GPTModel under DDP (and Float16Module in bf16)
        with capture_entropy(unwrapped) if with_entropy else contextlib.nullcontext([]) as entropy:
            out = model(
                mb.tokens,
                mb.position_ids,
                None,
                labels=mb.labels,
                loss_mask=mb.loss_mask,
                packed_seq_params=packed,
            )
        extra = {"entropy": entropy[-1]} if entropy else {}  # the main head's, after any MTP head's
        return out, functools.partial(loss_wrapper, mb, **extra)

    def _run(
        self, mbs: list[Microbatch], seq_length: int, mbs_rows: int, loss_wrapper, forward_only: bool,
        with_entropy: bool = False,
    ):
        fb = get_forward_backward_func()
        return fb(
            forward_step_func=functools.partial(self._forward_step, loss_wrapper, with_entropy),
            data_iterator=iter(mbs),
            model=self.model,
            num_microbatches=len(mbs),
            seq_length=seq_length,
            micro_batch_size=mbs_rows,
            forward_only=forward_only,
        )

    # ------------------------------------------------------------------------------------------
    def train_step(
        self, microbatches: Sequence[Microbatch], loss_fn: LossFn, *, entropy: bool = False
    ) -> dict[str, float]:
        """One optimizer step over this DP rank's microbatches; metrics identical on every rank.

        With entropy=True, loss_fn also receives the per-token policy entropy (`entropy=` keyword).

        Returns the summed `loss_fn` metrics (over microbatches and DP ranks), plus grad_norm, lr,
        mtp_loss / moe_aux_loss (means over microbatches, when enabled), update_ok (0: the non-finite
        guard skipped the update on every rank, train/nonfinite.py) and train/skipped_steps (so far).
        Raises NonFiniteError after optim.max_bad_steps consecutive skips.
        """
        mbs, seq_length, rows = self._prepare(microbatches)
        scale = len(mbs) * self.dp_size

        def loss_wrapper(mb: Microbatch, nll: torch.Tensor, **extra: torch.Tensor):
            loss, sums = loss_fn(-nll.float(), mb, **extra)
            sums = {OBJECTIVE: loss.detach(), **sums}  # the guard checks what backward saw
            return loss * scale, {k: v.detach().float() for k, v in sums.items()}

        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        clear_loss_trackers()
        self.guard.begin()
        outputs = self._run(mbs, seq_length, rows, loss_wrapper, forward_only=False, with_entropy=entropy)
        metrics = reduce_sums(outputs, self.layout.pp, self.device)
        metrics.update(aux_metrics(self.cfg, len(mbs), self.layout.pp, self.device))
        update_ok, grad_norm = self._update(metrics)
        metrics.pop(OBJECTIVE)
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["update_ok"] = float(update_ok)
        metrics["train/skipped_steps"] = float(self.guard.skipped)
        return metrics

    def _update(self, metrics: dict[str, float]) -> tuple[bool, float]:
        """megatron's optimizer step (ChainedOptimizer.step: grads to main grads, global norm, clip,
        step), split so the guard sees the loss and the norm before anything is written."""
        opt = self.optimizer
        found_inf = opt.prepare_grads()  # True only with a loss scaler (fp16)
        grad_norm = float(opt.get_grad_norm())  # all-reduced over the grad-stats (model-parallel) groups
        reason = self.guard.check(self.step + 1, metrics, grad_norm, found_inf)
        if reason is not None:
            if self.replicas is not None:
                self.replicas.discard_step()
            self.guard.skip(self.step + 1, reason)
            return False, grad_norm
        # lr for step s (1-based) is the schedule at s: the scheduler moves before the update.
        self.scheduler.step(increment=1)
        for part in getattr(opt, "chained_optimizers", [opt]):
            params = part.get_parameters()
            if part.config.clip_grad > 0.0 and params and not getattr(part, "is_stub_optimizer", False):
                # Looked up at call time: compat_cpu swaps in a CPU version on machines without CUDA.
                megatron_optimizer.clip_grad_by_total_norm_fp32(
                    params, max_norm=part.config.clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                )
        update_ok = opt.step_with_ready_grads()
        self.step += 1
        if self.replicas is not None:
            self.replicas.after_step(self.step)
        return bool(update_ok), grad_norm

    @torch.no_grad()
    def forward_logprobs(self, microbatches: Sequence[Microbatch]) -> list[torch.Tensor]:
        """Per-token label logprobs [b, s] (fp32, CPU) for each of this DP rank's microbatches.

        Forward only, main model only (no MTP); every rank of the pipeline gets the result."""
        mbs, seq_length, rows = self._prepare(microbatches)

        def keep(mb: Microbatch, nll: torch.Tensor):
            return torch.zeros((), device=nll.device), {"logprobs": -nll.float()}

        for chunk in self.model:
            chunk.eval()
        with mtp_disabled(self.unwrapped):
            outputs = self._run(mbs, seq_length, rows, keep, forward_only=True)
        for chunk in self.model:
            chunk.train()
        result = []
        last = parallel_state.is_pipeline_last_stage()
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        group = parallel_state.get_pipeline_model_parallel_group()
        for i, (mb, orig) in enumerate(zip(mbs, microbatches, strict=True)):
            if last:
                lp = outputs[i]["logprobs"]
            else:
                lp = torch.empty(mb.shape, dtype=torch.float32, device=self.device)
            if self.layout.pp > 1:
                dist.broadcast(lp, src=src, group=group)
            result.append(lp[:, : orig.shape[1]].cpu())
        return result
