"""Supervised fine-tuning on the trainer: the next-token loss, the prompt/response data and the loop.

The one SFT loop (`train_sft`) serves `r1m sft`, the demo's base, and every SFT-kind pipeline stage:
the R1 recipe's cold start and rejection-sampling SFT on the MoE policy, and distillation into a
dense student (a Qwen2 / Llama card) over the teacher's verified traces.

Loss: token-mean negative log-likelihood over the *global* batch (all microbatches of all DP ranks),
counting only response tokens: each microbatch contributes sum(-logp * mask) / N_global, so the
trainer's summed objective is the same for any split (see train/trainer.py).

Data: prompt/response pairs (a JSONL with "prompt" and "response", or the built-in task's worked
solutions) are tokenized with the chat template, packed best-fit into rows of data.seq_length tokens,
and dealt out as microbatches in a fixed, seeded order. `SFTData.position` (pairs consumed) is what a
checkpoint stores to resume exactly where the run stopped.

Loop: every step takes `pairs_per_step` pairs and runs one `Trainer.train_step`; checkpoints go to
checkpoint.dir every checkpoint.save_every steps and at the end, with the data position, so an
interrupted run resumes at the step and pair where it stopped; a fresh run starts at step 0 from the
weights in checkpoint.load (our checkpoint or an HF directory), or from the random init when it is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from r1_megatron.config.schema import JobConfig
from r1_megatron.data.packing import pack
from r1_megatron.data.tasks import epoch_order
from r1_megatron.train.microbatch import Microbatch, packed_microbatches, pad_for_data_parallel


def sft_loss(num_tokens: float):
    """Loss function for Trainer.train_step: response-token NLL divided by the global count."""
    denom = max(float(num_tokens), 1.0)

    def loss_fn(logprobs: torch.Tensor, mb: Microbatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = mb.loss_mask.to(logprobs.dtype)
        nll = -(logprobs * mask).sum()
        return nll / denom, {"loss": nll.detach() / denom, "num_tokens": mask.sum()}

    return loss_fn


def local_loss_tokens(microbatches: Sequence[Microbatch]) -> float:
    """Loss tokens in this rank's microbatches (sum over DP ranks for the global count)."""
    return float(sum(float(mb.loss_mask.sum()) for mb in microbatches))


@dataclass
class Example:
    """One tokenized pair: tokens [n] (prompt + response) and loss_mask [n] (1 on tokens to predict)."""

    tokens: list[int]
    loss_mask: list[float]


def load_pairs(cfg: JobConfig) -> list[dict]:
    """Prompt/response pairs: data.train_file (JSONL of {"prompt", "response"}; a bad line is an error
    naming it) or data.sft_examples pairs of the built-in task with worked solutions."""
    if cfg.data.train_file:
        from r1_megatron.data.jsonl import read_jsonl

        pairs, _ = read_jsonl(cfg.data.train_file, "sft", strict=True)
        return pairs
    from r1_megatron.data.tasks import make_items, sft_pairs
    from r1_megatron.data.tasks import task_kwargs

    items = make_items(n=cfg.data.sft_examples, **task_kwargs(cfg, "train"))
    return sft_pairs(items, seed=cfg.data.seed, wrong_fraction=cfg.data.sft_wrong_fraction)


def tokenize_pairs(pairs: Sequence[dict], tokenizer, seq_length: int, *, chat: bool = False) -> list[Example]:
    """Encode prompt + response (+ eos); the loss covers the response. Longer pairs are cut to seq_length."""
    from r1_megatron.data.chat import encode_sft

    out = []
    for pair in pairs:
        enc = encode_sft(tokenizer, pair["prompt"], pair["response"], chat=chat)
        tokens, mask = list(enc.input_ids)[:seq_length], list(enc.loss_mask)[:seq_length]
        out.append(Example(tokens, [float(m) for m in mask]))
    return out


class SFTData:
    """A seeded, endless stream of global batches of packed microbatches over `examples`.

    Each step takes `pairs_per_step` examples (reshuffled every epoch), packs them into rows of
    `seq_length`, and pads the row count to a multiple of dp * rows_per_microbatch with empty rows,
    so every DP rank gets the same number of microbatches. `position` counts examples consumed.
    """

    def __init__(self, examples: list[Example], pairs_per_step: int, seq_length: int, seed: int) -> None:
        if not examples:
            raise ValueError("SFT data: no examples")
        self.examples, self.pairs_per_step = examples, pairs_per_step
        self.seq_length, self.seed = seq_length, seed
        self.position = 0

    def next_batch(self, dp: int, rows_per_microbatch: int = 1) -> list[Microbatch]:
        """The next step's global list of microbatches (shard with microbatch.shard_for_data_parallel)."""
        chosen = []
        for k in range(self.position, self.position + self.pairs_per_step):
            epoch, i = divmod(k, len(self.examples))
            chosen.append(self.examples[epoch_order(len(self.examples), self.seed, epoch)[i]])
        self.position += self.pairs_per_step
        # The loss mask marks tokens to predict; packing's loss_mask is aligned with labels (t -> t+1).
        batch = pack([e.tokens for e in chosen], self.seq_length, loss_masks=[e.loss_mask for e in chosen])
        return pad_for_data_parallel(packed_microbatches(batch, rows_per_microbatch), dp)


@dataclass
class SFTResult:
    """What an SFT run did: the steps it started from and reached, and its last loss."""

    start_step: int
    steps: int
    loss: float | None
    checkpoint: Path


def train_sft(cfg: JobConfig, pairs: Sequence[dict], steps: int, pairs_per_step: int, log=None):
    """Run SFT until the trainer has taken `steps` optimizer steps (resuming from checkpoint.dir).

    Returns (trainer, SFTResult). `log(step, metrics)` receives every step's metrics."""
    from megatron.core import parallel_state

    from r1_megatron.data.tokenizer import job_tokenizer
    from r1_megatron.parallel.groups import init_process_groups
    from r1_megatron.train import checkpointing
    from r1_megatron.train.microbatch import shard_for_data_parallel
    from r1_megatron.train.trainer import Trainer
    from r1_megatron.train.weights import load_initial_weights

    if not pairs:
        raise ValueError("SFT: no prompt/response pairs to train on")
    layout, device = init_process_groups(cfg)
    examples = tokenize_pairs(pairs, job_tokenizer(cfg), cfg.data.seq_length, chat=cfg.data.chat)
    data = SFTData(examples, pairs_per_step, cfg.data.seq_length, cfg.seed)
    trainer = Trainer(cfg, layout, device)
    root = Path(cfg.checkpoint.dir)
    extra = checkpointing.resume(trainer, root) if cfg.checkpoint.resume else None
    if extra is None:
        load_initial_weights(trainer, cfg.checkpoint.load)
    else:
        data.position = int(extra["data_position"])
    start, loss = trainer.step, None
    for step in range(start, steps):
        mbs = data.next_batch(layout.dp, layout.micro_batch_size)
        mine = shard_for_data_parallel(mbs, parallel_state.get_data_parallel_rank(), layout.dp)
        metrics = trainer.train_step(mine, sft_loss(sum(local_loss_tokens([mb]) for mb in mbs)))
        loss = metrics["loss"]
        if log is not None:
            log(step + 1, metrics)
        if cfg.checkpoint.save_every and (step + 1) % cfg.checkpoint.save_every == 0:
            checkpointing.save(trainer, root, extra={"data_position": data.position})
    last = checkpointing.latest(root)
    if last is None or last.name != checkpointing.step_dir_name(trainer.step):
        checkpointing.save(trainer, root, extra={"data_position": data.position})
    return trainer, SFTResult(start, trainer.step, loss, root)


def run_sft(cfg: JobConfig, tokenizer=None) -> dict[str, float]:
    """`r1m sft`: SFT for optim.total_steps steps (`train_sft`) on data.train_file or
    the built-in task, checkpoints in checkpoint.dir (default run_dir/checkpoints), metrics in the run dir.

    Resumes from checkpoint.dir/latest; a fresh run starts from checkpoint.load (a megatron checkpoint
    of any layout, or an HF directory). Returns the last step's metrics."""
    import dataclasses

    from r1_megatron.config.loader import ConfigError
    from r1_megatron.data.tokenizer import check_vocab, job_tokenizer
    from r1_megatron.parallel.groups import init_process_groups
    from r1_megatron.train.metrics import MetricsLogger

    tok = tokenizer or job_tokenizer(cfg)
    check_vocab(tok, cfg)
    if cfg.data.sft_pairs_per_step < 1:
        raise ConfigError(f"data.sft_pairs_per_step must be >= 1, got {cfg.data.sft_pairs_per_step}")
    run_dir = Path(cfg.logging.run_dir)
    root = cfg.checkpoint.dir or str(run_dir / "checkpoints")
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, dir=root))
    init_process_groups(cfg)  # before the logger, which writes on rank 0 only
    logger = MetricsLogger(cfg.logging, run_dir, dataclasses.asdict(cfg))
    total, last = cfg.optim.total_steps, {}

    def log(step: int, metrics: dict) -> None:
        last.update(metrics)
        logger.log(step, {f"sft/{k}": v for k, v in metrics.items()})
        if torch.distributed.get_rank() == 0 and (step % max(cfg.logging.log_every, 1) == 0 or step == total):
            print(f"sft step {step}/{total} loss {metrics['loss']:.4f} "
                  f"grad_norm {metrics['grad_norm']:.3f} lr {metrics['lr']:.2e}", flush=True)

    train_sft(cfg, load_pairs(cfg), total, cfg.data.sft_pairs_per_step, log=log)
    logger.close()
    return last
