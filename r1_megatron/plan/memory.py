"""Per-GPU memory and refit traffic of a layout, on paper.

What is counted, per pipeline stage (every rank of a stage holds the same amount):
- params: bf16 weights of the stage's layers (+ embedding on the first stage; final norm, head and MTP on
  the last, which also keeps an embedding copy for MTP or tied heads when pp > 1, as megatron-core does);
- grads: megatron's contiguous main-grad buffer, full size on every rank (fp32 by default);
- optimizer: fp32 Adam m and v plus the fp32 main weights (12 bytes/param by default; 10 when the
  precision-aware optimizer keeps them as a 16-bit remainder of the bf16 weight, 8 in fp32 training:
  `Precision.for_training`, which `r1m plan` derives from model.dtype and optim.*); the distributed
  optimizer shards the dense part over dp*cp and the expert part over the expert-data-parallel size
  world / (ep*etp*pp);
- activations: bytes saved for backward per token and layer (Korthikanti et al., arXiv:2205.05198,
  redone for MLA + MoE with flash attention, which saves no s x s scores), times the micro-batches 1F1B
  keeps in flight on that stage (pp - stage); with full recompute only each layer's input is kept, plus
  one layer's working set; the last stage adds the logits (bf16 + fp32 copy + fp32 softmax).

Phases: train (static + activations), reference forward (static + a bf16 copy of the stage brought back
from the host + one forward working set), rollout (what the trainer leaves resident + vLLM's share
gpu_memory_utilization * M). Everything except rollout must fit in M * (1 - reserve_fraction); the reserve
stands for the CUDA context, NCCL buffers and allocator fragmentation.

vLLM's KV cache is what its share leaves after its weights (rollout TP shards, MLA's down-projections and
the router replicated, no MTP) and a fixed overhead. MLA caches kv_lora_rank + qk_rope_head_dim values
per token per layer, on every TP rank.

Refit: every rank ends with the full HF tensor stream (TP all-gather, EP all-gather, PP broadcast), so the
bytes a rank sends are its TP shards x (tp - 1), its experts x (ep*etp - 1), and its share of the
pipelined PP broadcasts, about the whole model x (pp - 1) / pp.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from r1_megatron.config.loader import ConfigError
from r1_megatron.config.schema import ModelConfig
from r1_megatron.config.validate import stage_layers
from r1_megatron.plan.params import (
    ParamCount,
    Weight,
    count_params,
    embedding_weight,
    head_weights,
    is_moe_layer,
    layer_weights,
    mtp_own_weights,
)

GiB = 1024**3


@dataclass(frozen=True)
class Layout:
    """The split: world = tp*cp*pp*dp GPUs for dense weights, ep*etp*edp*pp for experts."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 1
    cp: int = 1  # context parallel: only for planning public layouts; r1-megatron trains with cp = 1
    redundant_experts: int = 0
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    sequence_parallel: bool = False
    # full: keep only each layer's input, recompute the rest; selective is counted as none (an upper bound)
    recompute: Literal["none", "full", "selective"] = "none"
    distributed_optimizer: bool = True
    optimizer_on_host: bool = False  # megatron-core optimizer_cpu_offload (a what-if; not in r1-megatron)
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # GiB

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def edp(self) -> int:
        return self.world // (self.ep * self.etp * self.pp)


@dataclass(frozen=True)
class Workload:
    """What a step asks: the training micro-batch, the rollout engine and the phases."""

    seq_length: int  # tokens per training row; also the longest prompt + response in rollout
    micro_batch_size: int = 1
    microbatches: int | None = None  # per optimizer step and DP rank (None: at least pp)
    rollout_tp: int = 1
    rollout_dtype_bytes: int = 2
    gpu_memory_utilization: float = 0.5
    offload: bool = True  # trainer state leaves the GPU during rollout
    reference: bool = True  # a reference forward runs (kl_coef > 0)
    reference_on_host: bool = True


@dataclass(frozen=True)
class Precision:
    """Bytes per element and the assumptions that are not in the config."""

    param_bytes: int = 2  # bf16 weights
    grad_bytes: int = 4  # fp32 main grads (Megatron-LM's default for bf16 training)
    optim_bytes: int = 12  # fp32 main params + Adam exp_avg + exp_avg_sq
    act_bytes: int = 2  # bf16 activations
    logit_bytes: int = 10  # bf16 logits + fp32 copy + fp32 softmax kept for backward
    reserve_fraction: float = 0.10  # CUDA context, NCCL buffers, fragmentation
    rollout_overhead_gib: float = 2.0  # vLLM: non-torch memory and profiled activations

    @classmethod
    def for_training(cls, weight_bytes: int, main_param_bytes: int) -> Precision:
        """The bytes of what the trainer builds (model/precision.py): weights and activations in the
        training dtype, fp32 grad buffers, fp32 Adam moments (8) plus the optimizer's main copy of each
        weight (0 in fp32; 4 for a full fp32 copy, 2 for the precision-aware optimizer's 16-bit
        remainder). fp32 logits keep no bf16 copy (8 bytes instead of 10)."""
        return cls(param_bytes=weight_bytes, optim_bytes=8 + main_param_bytes, act_bytes=weight_bytes,
                   logit_bytes=10 if weight_bytes == 2 else 8)


@dataclass
class StagePlan:
    """One pipeline stage: its layers and the bytes on each of its ranks (by kind and by phase)."""

    stage: int
    layers: int
    params_per_rank: int  # elements
    bytes: dict[str, int]  # params, grads, optimizer, activations, logits
    phases: dict[str, int]  # train, reference, rollout
    host_offload_bytes: int  # pinned host memory this rank needs while offloaded
    refit_send_bytes: int


@dataclass
class Plan:
    """The whole plan. `problems` lists, with numbers, every reason the layout does not fit."""

    card: str
    counts: ParamCount
    layout: Layout
    workload: Workload
    stages: list[StagePlan]
    rollout: dict[str, float]
    budget_bytes: int
    refit_stream_bytes: int
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def worst(self) -> StagePlan:
        """The stage with the highest training-side peak (rollout takes the same share on every stage)."""
        return max(self.stages, key=lambda s: max(v for k, v in s.phases.items() if k != "rollout"))

    def host_per_node_bytes(self) -> int:
        return self.layout.gpus_per_node * max(s.host_offload_bytes for s in self.stages)


def check_layout(m: ModelConfig, lay: Layout, work: Workload) -> None:
    """Refuse splits megatron-core or vLLM cannot build; each message names the numbers."""
    for key in ("tp", "pp", "ep", "etp", "dp", "cp"):
        if getattr(lay, key) < 1:
            raise ConfigError(f"parallel.{key} must be >= 1, got {getattr(lay, key)}")
    if m.num_attention_heads % lay.tp:
        raise ConfigError(
            f"parallel.tp({lay.tp}) does not divide model.num_attention_heads({m.num_attention_heads})"
        )
    slots = m.num_experts + lay.redundant_experts
    if m.num_experts and lay.ep > slots:
        raise ConfigError(
            f"parallel.ep({lay.ep}) > physical expert slots({slots}): some EP ranks would hold no expert"
        )
    if m.num_experts and slots % lay.ep:
        raise ConfigError(f"parallel.ep({lay.ep}) does not divide physical expert slots({slots})")
    if m.num_experts and m.moe_ffn_hidden_size % lay.etp:
        raise ConfigError(
            f"parallel.etp({lay.etp}) does not divide model.moe_ffn_hidden_size({m.moe_ffn_hidden_size})"
        )
    if not m.num_experts and lay.ep > 1:
        raise ConfigError(f"parallel.ep({lay.ep}) > 1 needs experts, but model.num_experts is 0")
    if lay.world % (lay.ep * lay.etp * lay.pp):
        raise ConfigError(
            f"parallel: ep({lay.ep})*etp({lay.etp})*pp({lay.pp}) does not divide world({lay.world}) = "
            f"tp({lay.tp})*cp({lay.cp})*pp({lay.pp})*dp({lay.dp})"
        )
    stage_layers(m.num_layers, lay.pp, lay.first_stage_layers, lay.last_stage_layers)
    if lay.recompute not in ("none", "full", "selective"):
        raise ConfigError(f"parallel.recompute must be 'none', 'full' or 'selective', got {lay.recompute!r}")
    if lay.world % work.rollout_tp or m.num_attention_heads % work.rollout_tp:
        raise ConfigError(
            f"rollout.tp({work.rollout_tp}) must divide world({lay.world}) and "
            f"model.num_attention_heads({m.num_attention_heads})"
        )


def _rank_numel(w: Weight, lay: Layout, m: ModelConfig) -> float:
    if w.shard == "replicated":
        return w.total
    if w.shard == "expert":
        slots_per_rank = (m.num_experts + lay.redundant_experts) // lay.ep
        return w.numel * slots_per_rank / lay.etp
    return math.ceil(w.numel / lay.tp)


def stage_weights(m: ModelConfig, lay: Layout) -> list[list[Weight]]:
    """The weights each pipeline stage holds (MTP on the last stage, as megatron-core places it)."""
    counts = stage_layers(m.num_layers, lay.pp, lay.first_stage_layers, lay.last_stage_layers)
    out, start = [], 0
    for s, n in enumerate(counts):
        ws = [w for i in range(start, start + n) for w in layer_weights(m, i)]
        start += n
        if s == 0:
            ws.append(embedding_weight(m))
        if s == lay.pp - 1:
            ws += head_weights(m)
            ws += [
                dataclasses.replace(w, name=f"mtp.{k}.{w.name}")
                for k in range(m.mtp_num_layers)
                for w in mtp_own_weights(m, k)
            ]
            if lay.pp > 1 and (m.mtp_num_layers or m.tie_embeddings):
                # megatron keeps a copy of the embedding on the last stage for MTP / the tied head
                ws.append(dataclasses.replace(embedding_weight(m), name="embed_tokens.copy"))
        out.append(ws)
    return out


def in_rollout(w: Weight) -> bool:
    """Whether vLLM loads this weight (it skips MTP, and the embedding copy is not a separate HF tensor)."""
    return not (w.name.startswith("mtp.") or w.name.endswith(".copy"))


def activation_bytes_per_token(m: ModelConfig, moe: bool, lay: Layout, p: Precision) -> float:
    """Bytes one layer saves for backward per token of a micro-batch row (before dividing by cp)."""
    h, tp = m.hidden_size, lay.tp
    sp = tp if lay.sequence_parallel else 1  # sequence parallel shards the hidden-sized tensors
    if m.arch == "deepseek_v3":
        # q_a/kv_a norm inputs and up-projection inputs (replicated over TP); q, k, v and the output.
        lora = 2 * (m.q_lora_rank or 0) + 2 * m.kv_lora_rank
        heads = (
            m.num_attention_heads * (2 * (m.qk_nope_head_dim + m.qk_rope_head_dim) + 2 * m.v_head_dim) / tp
        )
    else:
        kv = (m.num_key_value_heads or m.num_attention_heads) * (h // m.num_attention_heads)
        lora, heads = 0, (2 * h + 2 * kv) / tp
    attn = 2 * h / sp + lora + heads  # norm input and normed input, then the projections
    if moe:
        shared = (
            (h / sp + 3 * m.moe_ffn_hidden_size * m.num_shared_experts / tp) if m.num_shared_experts else 0
        )
        # Each routed copy keeps its dispatched input and output (h, replicated over etp) and the fc1
        # (gate, up) and activation outputs (3F split over etp); copies per rank: topk * etp / tp.
        routed = m.router_topk * (2 * h * lay.etp + 3 * m.moe_ffn_hidden_size) / tp
        mlp = 2 * h / sp + 2 * m.num_experts / sp + shared + routed  # router logits are fp32
    else:
        mlp = 3 * h / sp + 3 * m.ffn_hidden_size / tp
    return p.act_bytes * (attn + mlp)


def _stage_activations(
    m: ModelConfig, lay: Layout, work: Workload, p: Precision, stage: int, first: int, n: int
) -> tuple[float, float, float]:
    """(activations kept by 1F1B, logits, one layer's working set) in bytes for the `n` layers of
    `stage` starting at layer `first` (plus MTP on the last stage)."""
    tokens = work.seq_length * work.micro_batch_size / lay.cp
    per_layer = [
        tokens * activation_bytes_per_token(m, is_moe_layer(m, i), lay, p) for i in range(first, first + n)
    ]
    if stage == lay.pp - 1:
        mtp_extra = 2 * m.hidden_size / (lay.tp if lay.sequence_parallel else 1) * p.act_bytes * tokens
        per_layer += [
            tokens * activation_bytes_per_token(m, m.num_experts > 0, lay, p) + mtp_extra
        ] * m.mtp_num_layers
    inflight = lay.pp - stage if work.microbatches is None else min(lay.pp - stage, work.microbatches)
    working_set = max(per_layer, default=0.0)
    if lay.recompute == "full":
        kept = tokens * m.hidden_size / (lay.tp if lay.sequence_parallel else 1) * p.act_bytes
        acts = inflight * kept * len(per_layer) + working_set
    else:
        acts = inflight * sum(per_layer)
    logits = 0.0
    if stage == lay.pp - 1:
        logits = (1 + m.mtp_num_layers) * tokens * m.vocab_size / lay.tp * p.logit_bytes
    return acts, logits, working_set


def _vllm_weight_bytes(m: ModelConfig, work: Workload) -> float:
    """One vLLM TP rank's weights: main model only (vLLM loads MTP only for speculative decoding)."""
    ws = (
        [w for i in range(m.num_layers) for w in layer_weights(m, i)]
        + [embedding_weight(m)]
        + head_weights(m)
    )
    numel = sum(w.total if w.shard == "replicated" else w.total / work.rollout_tp for w in ws)
    return numel * work.rollout_dtype_bytes


def kv_bytes_per_token(m: ModelConfig, work: Workload) -> float:
    """KV-cache bytes per token on one vLLM rank, all layers."""
    if m.arch == "deepseek_v3":
        per_layer = m.kv_lora_rank + m.qk_rope_head_dim  # MLA's latent cache, the same on every TP rank
    else:
        kv_heads = m.num_key_value_heads or m.num_attention_heads
        per_layer = 2 * max(1, kv_heads // work.rollout_tp) * (m.hidden_size // m.num_attention_heads)
    return per_layer * m.num_layers * work.rollout_dtype_bytes


def plan(m: ModelConfig, lay: Layout, work: Workload, p: Precision | None = None, card: str = "") -> Plan:
    """Plan `m` on `lay` for `work`; raises ConfigError for an impossible split, lists misfits in problems."""
    p = p or Precision()
    check_layout(m, lay, work)
    mem = lay.gpu_memory_gb * GiB
    budget = int(mem * (1 - p.reserve_fraction))
    counts = stage_layers(m.num_layers, lay.pp, lay.first_stage_layers, lay.last_stage_layers)
    stream_bytes = count_params(m).total * work.rollout_dtype_bytes  # what vLLM loads in one refit
    vllm_share = work.gpu_memory_utilization * mem
    stages, first = [], 0
    for s, ws in enumerate(stage_weights(m, lay)):
        numel = sum(_rank_numel(w, lay, m) for w in ws)
        trainable = [w for w in ws if w.trainable]
        dense = sum(_rank_numel(w, lay, m) for w in trainable if w.shard != "expert")
        expert = sum(_rank_numel(w, lay, m) for w in trainable if w.shard == "expert")
        shard_dense = lay.dp * lay.cp if lay.distributed_optimizer else 1
        shard_expert = lay.edp if lay.distributed_optimizer else 1
        optim = p.optim_bytes * (dense / shard_dense + expert / shard_expert)
        acts, logits, working = _stage_activations(m, lay, work, p, s, first, counts[s])
        first += counts[s]
        b = {
            "params": numel * p.param_bytes,
            "grads": (dense + expert) * p.grad_bytes,
            "optimizer": 0.0 if lay.optimizer_on_host else optim,
            "activations": acts,
            "logits": logits,
        }
        static = b["params"] + b["grads"] + b["optimizer"]
        ref_resident = 0.0 if (work.reference_on_host or not work.reference) else b["params"]
        phases = {"train": static + acts + logits + ref_resident}
        if work.reference:
            fwd_logits = logits * 6 / p.logit_bytes  # forward only: bf16 logits + fp32 log-softmax
            phases["reference"] = static + b["params"] + working + fwd_logits
        phases["rollout"] = (0.0 if work.offload else static) + ref_resident + vllm_share
        host = (static if work.offload else 0.0) + (optim if lay.optimizer_on_host else 0.0)
        host += b["params"] if (work.reference and work.reference_on_host) else 0.0
        tp_shard = sum(_rank_numel(w, lay, m) for w in ws if w.shard == "tp" and in_rollout(w))
        own_experts = sum(_rank_numel(w, lay, m) for w in ws if w.shard == "expert" and in_rollout(w))
        refit = work.rollout_dtype_bytes * (tp_shard * (lay.tp - 1) + own_experts * (lay.ep * lay.etp - 1))
        refit += stream_bytes * (lay.pp - 1) / lay.pp
        stages.append(
            StagePlan(
                stage=s,
                layers=counts[s],
                params_per_rank=int(numel),
                bytes={k: int(v) for k, v in b.items()},
                phases={k: int(v) for k, v in phases.items()},
                host_offload_bytes=int(host),
                refit_send_bytes=int(refit),
            )
        )
    weights = _vllm_weight_bytes(m, work)
    kv = vllm_share - weights - p.rollout_overhead_gib * GiB
    per_token = kv_bytes_per_token(m, work)
    rollout = {
        "vllm_share_bytes": vllm_share,
        "weights_per_gpu_bytes": weights,
        "overhead_bytes": p.rollout_overhead_gib * GiB,
        "kv_cache_bytes": max(kv, 0.0),
        "kv_bytes_per_token": per_token,
        "kv_tokens": max(kv, 0.0) / per_token,
        "full_length_sequences": math.floor(max(kv, 0.0) / (per_token * work.seq_length)),
        "instances": lay.world // work.rollout_tp,
    }
    result = Plan(card, count_params(m), lay, work, stages, rollout, budget, int(stream_bytes))
    result.problems = _problems(result)
    return result


def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def _problems(pl: Plan) -> list[str]:
    out = []
    for phase in ("train", "reference", "rollout"):
        over = [s for s in pl.stages if s.phases.get(phase, 0) > pl.budget_bytes]
        if not over:
            continue
        worst = max(over, key=lambda s: s.phases[phase])
        where = (
            f"stage {worst.stage}"
            if len(over) == 1
            else f"{len(over)} of {len(pl.stages)} stages, worst {worst.stage}"
        )
        if phase == "rollout":
            detail = (
                f"trainer resident {_gib(worst.phases[phase] - pl.rollout['vllm_share_bytes'])} + vLLM share "
                f"{_gib(pl.rollout['vllm_share_bytes'])}"
            )
        else:
            detail = ", ".join(f"{k} {_gib(v)}" for k, v in worst.bytes.items() if v)
        out.append(
            f"{phase} ({where}): {_gib(worst.phases[phase])} > budget {_gib(pl.budget_bytes)} = "
            f"gpu_memory_gb {pl.layout.gpu_memory_gb:g} GiB minus reserve ({detail})"
        )
    r = pl.rollout
    if r["full_length_sequences"] < 1:
        out.append(
            f"rollout: vLLM share {_gib(r['vllm_share_bytes'])} - weights "
            f"{_gib(r['weights_per_gpu_bytes'])} - overhead {_gib(r['overhead_bytes'])} leaves KV for "
            f"{r['kv_tokens']:.0f} tokens < one sequence of {pl.workload.seq_length} "
            f"(gpu_memory_utilization {pl.workload.gpu_memory_utilization}, "
            f"rollout.tp {pl.workload.rollout_tp})"
        )
    return out
