"""Distillation traces, SFT on prompt/response pairs with the megatron trainer, and the HF export.

Distillation (SPEC §8) runs it on a dense student (a Qwen2 / Llama card) over the teacher's verified
traces; the R1 recipe's cold-start and rejection-sampling stages run the very same code on the MoE
policy. The steps:

0. `sample_traces`: the teacher's HF export (the same files vLLM serves) samples k responses per
   train prompt; the verified, readable ones are kept (distill/rejection.py), or a kept set of an
   earlier stage is reused;

1. tokenize each pair with the chat template setting of the job (data.chat); the loss covers the
   response and its eos (data/chat.py `encode_sft`);
2. every step takes `pairs_per_step` pairs (seeded order, reshuffled each epoch), packs them best-fit
   into rows of data.seq_length (data/packing.py) and runs one `Trainer.train_step` with the
   token-mean NLL over the global batch (rl/sft.py);
3. checkpoints go to checkpoint.dir every checkpoint.save_every steps and at the end, with the data
   position, so an interrupted run resumes at the step and pair where it stopped; a fresh run starts
   at step 0 from the weights in checkpoint.load (our checkpoint or an HF directory), or from the
   random init when it is empty;
4. `export_hf` writes the trained weights as an HF directory: `Qwen2ForCausalLM` / `LlamaForCausalLM`
   for students (checkpoint/hf.py's dense tables), `DeepseekV3ForCausalLM` for the teacher.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from r1_megatron.config.schema import JobConfig

if TYPE_CHECKING:
    from r1_megatron.rl.stages import StageSpec


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

    from r1_megatron.checkpoint import dist as dist_ckpt
    from r1_megatron.data.tokenizer import job_tokenizer
    from r1_megatron.parallel.groups import init_process_groups
    from r1_megatron.rl.microbatch import shard_for_data_parallel
    from r1_megatron.rl.sft import SFTData, local_loss_tokens, sft_loss, tokenize_pairs
    from r1_megatron.rl.train_step import Trainer

    if not pairs:
        raise ValueError("SFT: no prompt/response pairs to train on")
    layout, device = init_process_groups(cfg)
    examples = tokenize_pairs(pairs, job_tokenizer(cfg), cfg.data.seq_length, chat=cfg.data.chat)
    data = SFTData(examples, pairs_per_step, cfg.data.seq_length, cfg.seed)
    trainer = Trainer(cfg, layout, device)
    root = Path(cfg.checkpoint.dir)
    extra = dist_ckpt.resume(trainer, root) if cfg.checkpoint.resume else None
    if extra is None:
        init_weights(trainer, cfg.checkpoint.load)
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
            dist_ckpt.save(trainer, root, extra={"data_position": data.position})
    last = dist_ckpt.latest(root)
    if last is None or last.name != dist_ckpt.step_dir_name(trainer.step):
        dist_ckpt.save(trainer, root, extra={"data_position": data.position})
    return trainer, SFTResult(start, trainer.step, loss, root)


def sample_traces(spec: StageSpec, job: JobConfig, teacher_hf: Path, d: Path) -> tuple[list[dict], dict]:
    """Verified traces of the teacher at `teacher_hf` (vLLM) for `spec.prompts` train prompts of the job's
    task, decontaminated against its eval split, filtered by `spec.rejection` (distill/rejection.py).
    Cached in d/traces.jsonl; d/traces_report.json, written after it, marks the set complete."""
    from r1_megatron.data.jsonl import read_jsonl, write_jsonl

    path, report_path = d / "traces.jsonl", d / "traces_report.json"
    if report_path.is_file():
        return read_jsonl(path, "sft", strict=True)[0], json.loads(report_path.read_text())
    from r1_megatron.data.tasks import chitchat_pairs, make_items
    from r1_megatron.data.tokenizer import job_tokenizer
    from r1_megatron.distill.rejection import rejection_sample
    from r1_megatron.eval.runner import make_pool
    from r1_megatron.rl.prompts import task_kwargs
    from r1_megatron.rollout.engine import SamplingParams
    from r1_megatron.rollout.vllm_engine import VLLMEngine

    items = make_items(n=spec.prompts, **task_kwargs(job, "train"))
    eval_texts = [it["question"] for it in make_items(n=job.data.num_eval, **task_kwargs(job, "eval"))]
    chat = chitchat_pairs(64, seed=job.data.seed, template=job.data.template) \
        if spec.rejection.non_reasoning_fraction else None
    engine, pool = VLLMEngine(teacher_hf, job.rollout), make_pool(job.reward)
    try:
        records, report = rejection_sample(engine, job_tokenizer(job), items, spec.rejection,
                                           SamplingParams.from_config(job.rollout), eval_texts=eval_texts,
                                           non_reasoning=chat, pool=pool, chat=job.data.chat)
    finally:
        pool.close()
        engine.close()
    if not records:
        raise RuntimeError(f"stage {spec.name}: rejection sampling kept no sample of {report.get('samples')} "
                           f"(rejected: {report}); sample more prompts or train the policy longer")
    tmp = path.with_name(".traces.jsonl.tmp")
    write_jsonl(tmp, records)
    tmp.replace(path)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    return records, report


def init_weights(trainer, source: str) -> None:
    """Weights only, from our checkpoint (root or step dir, any layout) or an HF directory: a new
    stage starts at step 0 with a fresh optimizer and LR schedule ("": keep the random init)."""
    from r1_megatron.checkpoint import dist as dist_ckpt
    from r1_megatron.rl.session import load_initial_weights

    path = Path(source)
    if not source or ((path / "config.json").is_file() and not (path / "metadata.json").is_file()):
        load_initial_weights(trainer, source)
        return
    if not (path / "metadata.json").is_file():
        path = dist_ckpt.latest(path) or path
    dist_ckpt.load_model_weights(trainer.unwrapped, path)


def export_hf(trainer, out_dir: str | Path) -> Path | None:
    """The trainer's weights as an HF directory with the job's tokenizer (rank 0 writes)."""
    from r1_megatron.data.tokenizer import tokenizer_dir
    from r1_megatron.rl.session import export_hf as export

    return export(trainer, out_dir, tokenizer_dir(trainer.cfg))
