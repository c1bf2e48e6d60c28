"""Supervised fine-tuning on the trainer: the next-token loss and the prompt/response data.

Loss: token-mean negative log-likelihood over the *global* batch (all microbatches of all DP ranks),
counting only response tokens: each microbatch contributes sum(-logp * mask) / N_global, so the
trainer's summed objective is the same for any split (see rl/train_step.py).

Data: prompt/response pairs (a JSONL with "prompt" and "response", or the built-in task's worked
solutions) are tokenized with the chat template, packed best-fit into rows of data.seq_length tokens,
and dealt out as microbatches in a fixed, seeded order. `SFTData.position` (pairs consumed) is what a
checkpoint stores to resume exactly where the run stopped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from r1_megatron.config.schema import JobConfig
from r1_megatron.data.packing import pack
from r1_megatron.rl.microbatch import Microbatch, packed_microbatches


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
    from r1_megatron.rl.prompts import task_kwargs

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

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, dp: int, rows_per_microbatch: int = 1) -> list[Microbatch]:
        """The next step's global list of microbatches (shard with microbatch.shard_for_data_parallel)."""
        chosen = []
        for k in range(self.position, self.position + self.pairs_per_step):
            epoch, i = divmod(k, len(self.examples))
            chosen.append(self.examples[self._order(epoch)[i]])
        self.position += self.pairs_per_step
        # The loss mask marks tokens to predict; packing's loss_mask is aligned with labels (t -> t+1).
        batch = pack([e.tokens for e in chosen], self.seq_length, loss_masks=[e.loss_mask for e in chosen])
        mbs = packed_microbatches(batch, rows_per_microbatch)
        while len(mbs) % dp:
            mbs.append(_empty_like(mbs[-1]))
        return mbs


def _empty_like(mb: Microbatch) -> Microbatch:
    """A padding-only microbatch of the same shape: contributes nothing to the loss."""
    n = mb.shape[1]
    return Microbatch(
        tokens=torch.zeros_like(mb.tokens),
        labels=torch.zeros_like(mb.labels),
        loss_mask=torch.zeros_like(mb.loss_mask),
        position_ids=torch.arange(n).reshape(1, n),
        cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
    )


def run_sft(cfg: JobConfig, tokenizer=None) -> dict[str, float]:
    """`r1m sft`: SFT for optim.total_steps steps (distill/student.py `train_sft`) on data.train_file or
    the built-in task, checkpoints in checkpoint.dir (default run_dir/checkpoints), metrics in the run dir.

    Resumes from checkpoint.dir/latest; a fresh run starts from checkpoint.load (a megatron checkpoint
    of any layout, or an HF directory). Returns the last step's metrics."""
    import dataclasses
    from pathlib import Path

    from r1_megatron.config.loader import ConfigError
    from r1_megatron.data.tokenizer import check_vocab, job_tokenizer
    from r1_megatron.distill.student import train_sft
    from r1_megatron.parallel.groups import init_process_groups
    from r1_megatron.rl.metrics import MetricsLogger

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
