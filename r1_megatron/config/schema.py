"""The typed config tree. Every field has a one-line docstring comment; docs/grpo.md explains the RL defaults.

A job config (configs/*.yaml) names a model card (models/*.yaml) under `model.card` and may override
any card field next to it. Sections: model, parallel, optim, rl, rollout, reward, checkpoint, offload,
data, logging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A config problem, stated in one line that names the key."""


@dataclass
class ModelConfig:
    """Architecture of the network (docs/architecture.md#model). Loaded from a model card."""

    card: str = ""  # name of the model card in models/ (or a path to a YAML file)
    arch: Literal["deepseek_v3", "qwen2", "llama"] = "deepseek_v3"  # network family
    hidden_size: int = 256  # d_model
    num_layers: int = 3  # transformer layers in the main model (MTP layers not counted)
    first_k_dense: int = 1  # the first k layers use a dense MLP instead of MoE
    num_attention_heads: int = 4  # attention heads
    num_key_value_heads: int | None = None  # GQA groups for dense students (None = MHA)
    # MLA
    q_lora_rank: int | None = 128  # q compression rank (None: q is projected directly)
    kv_lora_rank: int = 512  # kv compression rank
    qk_nope_head_dim: int = 32  # per-head q/k dims without rope
    qk_rope_head_dim: int = 64  # per-head q/k dims with rope (shared k_pe)
    v_head_dim: int = 32  # per-head value dim
    # rope / YaRN
    rope_theta: float = 10000.0  # rope base
    max_position_embeddings: int = 4096  # longest sequence the model supports
    yarn_factor: float | None = None  # YaRN scaling factor (None: plain rope)
    original_max_position: int = 4096  # YaRN: context length before scaling
    beta_fast: float = 32.0  # YaRN beta_fast
    beta_slow: float = 1.0  # YaRN beta_slow
    mscale: float = 1.0  # YaRN mscale
    mscale_all_dim: float = 0.0  # YaRN mscale_all_dim
    # MLP
    ffn_hidden_size: int = 512  # intermediate size of the dense MLP layers
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2 students)
    # MoE
    moe_ffn_hidden_size: int = 128  # intermediate size of one routed expert
    num_experts: int = 0  # routed experts (0: dense model)
    num_shared_experts: int = 1  # shared experts (each of moe_ffn_hidden_size)
    router_topk: int = 2  # experts per token
    n_group: int = 1  # expert groups for group-limited routing
    topk_group: int = 1  # groups kept per token
    routed_scaling_factor: float = 1.0  # multiplies the normalized gate weights
    norm_topk_prob: bool = True  # normalize the chosen gate weights to sum 1
    score_function: Literal["sigmoid", "softmax"] = "sigmoid"  # router score function
    bias_update_rate: float = 0.001  # aux-loss-free expert-bias update rate (0: off)
    seq_aux_loss_coeff: float = 0.0001  # sequence-wise auxiliary balance loss coefficient
    # MTP
    mtp_num_layers: int = 0  # multi-token prediction layers
    mtp_loss_scale: float = 0.3  # weight of the MTP loss
    # misc
    vocab_size: int = 512  # vocabulary size
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share input and output embeddings
    init_std: float = 0.02  # std of the random init
    bos_token_id: int | None = None  # written into the HF config
    eos_token_id: int | None = None  # written into the HF config
    # Training dtype of the weights (auto: bfloat16 on CUDA, float32 elsewhere). bfloat16 trains as
    # Megatron-LM does: bf16 weights under Float16Module, fp32 main weights, grads and Adam moments in
    # the optimizer, fp32 loss and logprobs; the reference model uses the same dtype.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


@dataclass
class ParallelConfig:
    """How the model is split (megatron-core parallel_state)."""

    tp: int = 1  # tensor parallel size
    pp: int = 1  # pipeline parallel size
    ep: int = 1  # expert parallel size
    etp: int = 1  # expert tensor parallel size
    dp: int = 0  # data parallel size (0: derived as world_size / (tp*pp))
    sequence_parallel: bool = False  # required with tp>1 and MoE
    redundant_experts: int = 0  # extra physical expert slots (R - E)
    rebalance_every: int = 0  # re-plan redundant experts from measured loads every N steps (0: never)
    micro_batch_size: int = 1  # sequences (or packed rows) per microbatch
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"  # MoE token dispatcher
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # torch.distributed backend (auto: nccl on GPU)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where the trainer runs
    first_stage_layers: int | None = None  # layers on the first pipeline stage (None: even split)
    last_stage_layers: int | None = None  # layers on the last pipeline stage (None: even split)
    # activation recompute (full: every layer, megatron uniform/1; selective: recompute_modules only)
    recompute: Literal["none", "full", "selective"] = "none"
    # selective recompute: megatron-core's recompute_modules (core_attn, mla_up_proj, mlp, moe,
    # shared_experts; GPU only: moe_act (grouped GEMM), layernorm (TE)); [] means megatron's ["core_attn"]
    recompute_modules: list[str] = field(default_factory=list)
    gpus_per_node: int = 8  # GPUs per node (planner and launch checks)
    gpu_memory_gb: float = 80.0  # memory of one GPU in GiB (planner budget)


@dataclass
class OptimConfig:
    """Adam and its schedule (megatron-core optimizer)."""

    lr: float = 1e-4  # peak learning rate
    min_lr: float = 0.0  # final learning rate of the decay
    weight_decay: float = 0.0  # decoupled weight decay
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.95  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon
    clip_grad: float = 1.0  # global grad-norm clip (0: off)
    warmup_steps: int = 0  # linear warmup steps
    decay_style: Literal["constant", "linear", "cosine"] = "constant"  # lr decay after warmup
    total_steps: int = 100  # steps the schedule spans
    distributed_optimizer: bool = True  # shard optimizer state over DP (GPU only; CPU uses the plain one)
    # bf16 + distributed optimizer on GPU: megatron's precision-aware optimizer (TE FusedAdam keeps the
    # fp32 main weights as bf16 weight + 16-bit remainder; fp32 grads and moments)
    precision_aware: bool = True
    # Skip an update whose loss or global grad norm is not finite (weights, Adam state and expert bias
    # untouched, counted as train/skipped_steps); false lets the NaN through (a negative control only).
    skip_nonfinite: bool = True
    max_bad_steps: int = 3  # stop after this many consecutive skipped steps (GRPO, SFT, distillation)


@dataclass
class RLConfig:
    """GRPO (docs/grpo.md)."""

    steps: int = 10  # GRPO steps
    prompts_per_step: int = 8  # prompts per rollout batch
    group_size: int = 8  # G samples per prompt
    std_normalize: bool = True  # False: Dr. GRPO advantages
    baseline: Literal["mean", "leave_one_out"] = "mean"  # group baseline
    adv_eps: float = 1e-6  # advantage std epsilon
    clip_eps_low: float = 0.2  # ratio clip below
    clip_eps_high: float = 0.2  # ratio clip above (DAPO clip-higher: 0.28)
    dual_clip_c: float | None = None  # dual clip bound for A<0 (None: off, 3.0 typical)
    kl_coef: float = 0.001  # beta (0: no reference forward)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # KL estimator
    kl_in: Literal["loss", "reward"] = "loss"  # where the KL enters
    loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    dynamic_sampling: bool = False  # drop all-equal groups and resample
    max_resample_rounds: int = 3  # bound on dynamic-sampling retries
    overlong: Literal["none", "penalty", "soft_penalty", "mask"] = "none"  # truncated-sample handling
    overlong_buffer: int = 16  # soft penalty ramps over the last buffer tokens
    tis: float | None = None  # truncated importance sampling cap C (None: off)
    # Off-policy masks (docs/grpo.md, rl/corrections.py); a removed token leaves the loss and its normalizer.
    mis: list[float] | None = None  # [low, high]: drop a sequence whose geometric-mean pi_old/pi_rollout is outside
    icepop: list[float] | None = None  # [low, high] (IcePop: [0.5, 5]): drop a token whose ratio is outside
    offpolicy_mask_delta: float | None = None  # DeepSeek-V3.2: drop A<0 sequences with KL(rollout||theta) > delta
    # Router replay (rl/router_replay.py): r3 replays the rollout's expert selection in the trainer's
    # forward (pi_old and the update); r2 records the trainer's own selection at pi_old and replays it.
    router_replay: Literal["off", "r2", "r3"] = "off"
    num_minibatches: int = 1  # optimizer steps per rollout batch
    ppo_epochs: int = 1  # passes over the rollout batch
    # log pi_old: "fused" takes it from the training forward itself (detached) when the batch makes one
    # optimizer step (num_minibatches = ppo_epochs = 1: same weights, one forward fewer); otherwise, or
    # with "separate", a separate trainer forward before the update computes it.
    old_logprob_pass: Literal["fused", "separate"] = "fused"
    # Pack each group's prompt once with its G responses (rl/shared_prompts.py): same logprobs and loss,
    # ~(G-1)/G of the prompt tokens fewer to compute. Needs the local spec's MLA (CPU path).
    share_prompts: bool = False
    # mean |logprob error| between trainer and vLLM over the canary's sampled tokens after a refit;
    # None: by the engine's and the trainer's dtypes (rollout/refit.py CANARY_TOL: fp32 1e-3, bf16 0.05, mixed 0.15)
    canary_tol: float | None = None
    entropy_coef: float = 0.0  # entropy bonus (0: off)
    eval_every: int = 0  # steps between held-out evaluations during RL (0: only before and after)
    eval_samples: int = 4  # samples per eval prompt for pass@1 (T=0.6, top-p 0.95, docs/architecture.md)
    canary_length: int = 16  # canary: random prompt tokens, and tokens the engine samples after them
    # MTP loss on the policy's own samples during RL (rl/mtp.py; 0: the MTP head is not run in RL steps)
    mtp_loss_coef: float = 0.0
    mtp_detach_trunk: bool = True  # the MTP loss trains only the MTP head, never the policy trunk


@dataclass
class SpeculativeConfig:
    """Self-speculative rollout: vLLM drafts with the model's own MTP head and verifies with the policy."""

    method: Literal["none", "mtp"] = "none"  # none: plain decoding; mtp: vLLM's MTP speculative config
    num_speculative_tokens: int = 1  # K draft tokens per step (>= 1; more than the MTP layers reuses the last)


@dataclass
class RolloutConfig:
    """The rollout engine (vLLM)."""

    engine: Literal["vllm"] = "vllm"  # rollout backend
    # colocated: every trainer rank is also a vLLM rank (external launcher); separate: engines in processes
    # of their own (rollout/separate.py).
    placement: Literal["colocated", "separate"] = "colocated"
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling
    max_new_tokens: int = 64  # max response length
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # vLLM weights dtype
    tp: int = 1  # vLLM tensor parallel size: one engine per `tp` consecutive ranks
    gpu_memory_utilization: float = 0.5  # vLLM share of GPU memory (GPU)
    bucket_mb: int = 64  # refit bucket size
    enforce_eager: bool = True  # no CUDA graphs / compile
    seed: int = 0  # sampling seed
    redundant_experts: int = 0  # must be 0: vLLM 0.32 needs EPLB for it, which breaks refits
    max_model_len: int = 0  # prompt + response tokens vLLM plans a sequence for (0: the model's max positions)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)  # MTP self-speculation
    startup_timeout_s: float = 600.0  # multi-rank: how long an engine waits for the other ranks to start theirs
    capture_routing: bool = False  # MoE: capture each sample's routed experts (forced on by rl.router_replay)
    engines: int = 1  # separate placement: engine processes (each on rollout.tp devices of its own on GPU)
    timeout_s: float = 600.0  # separate placement: longest wait on an engine (start, refit, silence mid-rollout)
    # YAML key `rollout.async`. one_step: generation of step k+1 overlaps training of step k (needs separate
    # placement and rl.tis; the loss is the decoupled objective, rl/loop.py). off: exactly on-policy.
    async_: Literal["off", "one_step"] = "off"


@dataclass
class SandboxConfig:
    """Limits for untrusted code (docs/grpo.md#rewards)."""

    wall_seconds: float = 10.0  # wall-clock kill
    cpu_seconds: int = 5  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS
    max_processes: int = 16  # RLIMIT_NPROC
    file_size_mb: int = 16  # RLIMIT_FSIZE
    open_files: int = 64  # RLIMIT_NOFILE
    max_output_bytes: int = 1_000_000  # stdout/stderr kept per run
    isolation: Literal["auto", "bwrap", "unshare", "none"] = "auto"  # strongest available by default
    require_no_network: bool = False  # refuse to run if no network namespace can be made
    uid: int = 65534  # unprivileged uid the code runs as when the trainer is root (root ignores RLIMIT_NPROC)
    python: str = ""  # interpreter for the code ("": the trainer's base interpreter, else /usr/bin/python3)
    tmpfs_mb: int = 64  # size of the code's /tmp (its working directory) and /dev/shm under bwrap


@dataclass
class RewardConfig:
    """Reward components and the scoring pool (docs/grpo.md#rewards)."""

    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    num_workers: int = 2  # scoring processes
    timeout_s: float = 10.0  # hard per-item timeout
    code_mode: Literal["fraction", "all"] = "fraction"  # code reward: fraction of tests, or all-or-nothing
    language: str = "en"  # target language for language consistency
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (docs/architecture.md#checkpoints-and-offload)."""

    dir: str = ""  # where checkpoints go (default: <run_dir>/checkpoints)
    save_every: int = 0  # steps between saves (0: only at the end)
    load: str = ""  # checkpoint or HF directory to start from
    resume: bool = True  # resume from dir/latest when present
    verify: Literal["full", "size", "off"] = "full"  # check files against the manifest before a load
    allow_fresh_optimizer: bool = False  # resume even from a checkpoint without optimizer state (Adam restarts)


@dataclass
class OffloadConfig:
    """Moving the training state off the device between phases (docs/architecture.md)."""

    enabled: bool = True  # offload params/grads/optimizer during rollout
    pin_memory: bool = True  # pinned host buffers (GPU only)
    reference_on_host: bool = True  # keep the reference model on the host between its forwards


@dataclass
class DataConfig:
    """Prompts and sequences."""

    tokenizer: str = ""  # HF tokenizer directory ("": the shipped 512-id test tokenizer of the tiny cards)
    task: str = "arithmetic"  # built-in task (arithmetic | countdown), or "" to read train_file
    template: Literal["r1_zero", "compact", "plain"] = "compact"  # prompt template (all end "Assistant: <think>")
    chat: bool = False  # wrap prompts in the tokenizer's chat template (same for SFT and RL)
    digits: int = 2  # arithmetic operand digits
    ops: list[str] = field(default_factory=lambda: ["+", "-"])  # arithmetic operators
    mul_digits: int = 1  # digits of the second operand of a product
    sft_examples: int = 2000  # synthetic SFT pairs for a base/cold-start stage
    sft_wrong_fraction: float = 0.0  # share of SFT answers made wrong on purpose (a weak base)
    sft_pairs_per_step: int = 32  # prompt/response pairs per `r1m sft` optimizer step (over all DP ranks)
    train_file: str = ""  # JSONL prompts {"prompt", "answer"} or SFT pairs {"prompt", "response"}
    eval_file: str = ""  # JSONL eval prompts
    seq_length: int = 256  # packed row capacity / max sequence length
    num_eval: int = 64  # held-out eval prompts
    seed: int = 0  # data seed


@dataclass
class LoggingConfig:
    """Where results go."""

    run_dir: str = "runs/default"  # run directory (resolved config, metrics, checkpoints)
    tensorboard: bool = True  # write TensorBoard events
    wandb_project: str = ""  # log to wandb when set
    log_every: int = 1  # steps between metric lines
    progress: bool = True  # show a progress bar
    verbose: bool = False  # vLLM logs at INFO (default WARNING: its INFO lines break the progress bar)


@dataclass
class JobConfig:
    """The whole job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 1234  # global seed
