"""Distillation traces: the teacher's verified responses to train prompts, the data of the
distill and rejection-sampling stages (docs/architecture.md#the-r1-recipe).

`sample_traces`: the teacher's HF export (the same files vLLM serves) samples k responses per train
prompt; the verified, readable ones are kept (distill/rejection.py). The stage then runs the one SFT
loop (train/sft.py) on them: on a dense student (a Qwen2 / Llama card) for distillation, on the MoE
policy for the R1 recipe's rejection-sampling stage, and exports it with train/weights.py `export_hf`
(`Qwen2ForCausalLM` / `LlamaForCausalLM` for students, checkpoint/hf.py's dense tables).
"""

from __future__ import annotations

import json
from pathlib import Path

from r1_megatron.config.schema import JobConfig


def sample_traces(spec, job: JobConfig, teacher_hf: Path, d: Path) -> tuple[list[dict], dict]:
    """spec: the stage's spec (pipeline/spec.py StageSpec: name, prompts, rejection). Verified traces of the teacher at `teacher_hf` (vLLM) for `spec.prompts` train prompts of the job's
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
    from r1_megatron.data.tasks import task_kwargs
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
