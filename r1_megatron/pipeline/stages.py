"""Running the stages of the R1 recipe (docs/architecture.md#the-r1-recipe): what each kind reads and writes.

Every stage writes DIR/<name>/ (DIR/<dir>/ with a `dir`) and returns a record (kept in done.json)
naming its outputs, relative to DIR. Kinds:
- sft: SFT of the policy on the built-in task's worked solutions (data.sft_examples pairs, a share
  data.sft_wrong_fraction of them wrong on purpose) or on data.train_file. Starts from the previous
  policy stage's checkpoint (the first one from the base job's checkpoint.load, or the random init).
  Writes checkpoints/, hf/ and metrics.jsonl.
- grpo: the GRPO loop (rl/loop.py) from the previous policy's checkpoint (weights only), which is
  also the frozen reference. Writes checkpoints/, hf/ and metrics.jsonl. R1-Zero is a pipeline whose
  only training stage is this one. With `own_eval` the run's own evaluator (RunState.evaluate:
  rl.eval_samples samples on data.num_eval prompts, as inside the loop every rl.eval_every steps)
  measures the policy before GRPO (kept in base_accuracy.json, so that a resumed run reports the
  base's score) and after; the record holds base_accuracy and final_accuracy. This is the demo.
- rejection_sampling: sample `rejection.k` responses for `prompts` train prompts from the previous
  policy's HF export, keep the verified, readable ones (distill/rejection.py), mix in non-reasoning
  pairs, then SFT the previous policy on them. Writes traces.jsonl, checkpoints/, hf/.
- distill: traces from the teacher (the previous policy's HF export, sampled and verified as above,
  or the kept set of the stage named by `traces`), then SFT of the dense `student` card (random init
  unless the stage's overrides give checkpoint.load). Writes traces.jsonl, checkpoints/, hf/
  (Qwen2ForCausalLM / LlamaForCausalLM).
- eval: pass@1 of the latest policy (the teacher) and of the latest student on the task's held-out
  split, `eval_k` samples per prompt at T 0.6, top-p 0.95 (eval/runner.py). Writes eval.json.
`init` redirects where a stage starts from: another earlier policy stage, or "base" for the base
job's checkpoint.load. With `eval_prompts` > 0 a training stage also measures its held-out pass@1
(eval/runner.py on the stage's HF export; own_eval uses the same scorer through the run's engine).

Departure from DeepSeek-R1: its stage-3 SFT retrains the *base* model on the rejection-sampled set;
here it continues from the RL policy by default (set `init: <cold-start stage>` or `base` for R1's
choice). The tiny models need every step they get.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path

from r1_megatron.config.loader import ConfigError
from r1_megatron.config.schema import JobConfig
from r1_megatron.pipeline.spec import POLICY_KINDS, Stage, StageSpec


class Context:
    """The pipeline directory and the records of the stages done so far (paths relative to it)."""

    def __init__(self, out: Path):
        self.out = out
        self.records: dict[str, dict] = {}

    def stage_dir(self, name: str, where: str = "") -> Path:
        """DIR/<name>, or DIR/<where> for a stage with a `dir` ("." is DIR itself)."""
        return self.out / (where or name)

    def path(self, record: dict, output: str) -> Path:
        return self.out / record["outputs"][output]

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.out))

    def completed(self, stage: Stage) -> dict | None:
        """The stage's done.json record, or None when the stage is to run: not done, or a grpo stage
        done with fewer steps than its rl.steps now asks (it resumes from its checkpoints). A record
        made under another config (less the keys a resumed run may change) is an error naming the
        changed keys."""
        d = self.stage_dir(stage.spec.name, stage.spec.dir)
        done = d / "done.json"
        if not done.is_file():
            return None
        record = json.loads(done.read_text())
        if record.get("digest") != stage.digest:
            from r1_megatron.config.loader import config_changes

            saved = d / "config.resolved.yaml"
            changes = config_changes(saved, stage.job) if saved.is_file() else []
            what = "; ".join(changes) or "its spec or an earlier stage changed"
            raise ConfigError(f"stage '{stage.spec.name}' was completed with a different config ({done}); "
                              f"remove {d} to run it again: {what}")
        if stage.spec.kind == "grpo" and record["steps"] < stage.job.rl.steps:
            return None
        return record

    def add(self, record: dict) -> None:
        self.records[record["name"]] = record

    def policy(self, init: str) -> dict | None:
        """The record of the policy a stage starts from (None: the base job's checkpoint.load)."""
        if init == "base":
            return None
        if init:
            return self.records[init]
        policies = [r for r in self.records.values() if r["kind"] in POLICY_KINDS]
        return policies[-1] if policies else None

    def student(self) -> dict | None:
        students = [r for r in self.records.values() if r["kind"] == "distill"]
        return students[-1] if students else None


def _in_stage_dirs(job: JobConfig, d: Path, load: str | None) -> JobConfig:
    ckpt = dataclasses.replace(job.checkpoint, dir=str(d / "checkpoints"),
                               load=job.checkpoint.load if load is None else load)
    return dataclasses.replace(job, checkpoint=ckpt, logging=dataclasses.replace(job.logging, run_dir=str(d)))


def stage_job(ctx: Context, stage: Stage) -> JobConfig:
    """The job config a stage runs with: its resolved job in its own directory, starting from the
    weights of the previous policy's own checkpoint (fp32, the same values as its HF export, and
    loadable at any layout). Weights only: the stage begins at step 0 with a fresh optimizer and LR
    schedule. A distill stage's student keeps its own checkpoint.load."""
    source = ctx.policy(stage.spec.init)
    load = None if source is None or stage.spec.kind == "distill" else str(ctx.path(source, "checkpoint"))
    return _in_stage_dirs(stage.job, ctx.stage_dir(stage.spec.name, stage.spec.dir), load)


def run_stage(ctx: Context, stage: Stage) -> dict:
    """Run one stage to completion (resuming its own checkpoints); returns its done.json record."""
    from r1_megatron.config import save_resolved

    spec, d = stage.spec, ctx.stage_dir(stage.spec.name, stage.spec.dir)
    d.mkdir(parents=True, exist_ok=True)
    source, job = ctx.policy(spec.init), stage_job(ctx, stage)
    save_resolved(job, d)
    started = time.time()
    runner = {"sft": _sft, "grpo": _grpo, "rejection_sampling": _rejection, "distill": _distill,
              "eval": _eval}
    try:
        record = runner[spec.kind](ctx, spec, job, d, source)
    finally:
        gc.collect()
    role = {"distill": "student", "eval": None}.get(spec.kind, "teacher")
    return {"name": spec.name, "kind": spec.kind, "role": role,
            "digest": stage.digest, "seconds": round(time.time() - started, 1), **record}


def _teacher_hf(ctx: Context, source: dict | None, job: JobConfig) -> Path:
    if source is not None:
        return ctx.path(source, "hf")
    hf = Path(job.checkpoint.load)
    if not (hf / "config.json").is_file():
        raise ConfigError(f"init: base needs an HF directory in checkpoint.load to sample from, got '{hf}'")
    return hf


def _trained(ctx: Context, trainer, result, spec: StageSpec, job: JobConfig, d: Path) -> dict:
    """Export the trained policy and measure its pass@1 (eval_prompts > 0)."""
    from r1_megatron.train.weights import export_hf

    hf = d / "hf"
    export_hf(trainer, hf)  # collective; rank 0 writes
    record = {"outputs": {"checkpoint": ctx.rel(result.checkpoint), "hf": ctx.rel(hf)},
              "start_step": result.start_step, "steps": result.steps, "final_loss": result.loss}
    if spec.eval_prompts:
        record["pass_at_1"] = evaluate_hf(hf, job, spec.eval_prompts, spec.eval_k)["pass_at_1"]
    return record


def _sft_log(job: JobConfig, d: Path, steps: int):
    from r1_megatron.train.metrics import MetricsLogger, is_rank0

    logger = MetricsLogger(job.logging, d)

    def log(step: int, metrics: dict) -> None:
        logger.log(step, metrics)
        if is_rank0() and (step % 25 == 1 or step == steps):
            print(f"sft step {step}/{steps} loss {metrics['loss']:.4f}", flush=True)

    return logger, log


def _sft(ctx: Context, spec: StageSpec, job: JobConfig, d: Path, source: dict | None) -> dict:
    from r1_megatron.train.sft import load_pairs

    return _sft_on(ctx, spec, job, d, load_pairs(job))


def _grpo(ctx: Context, spec: StageSpec, job: JobConfig, d: Path, source: dict | None) -> dict:
    from r1_megatron.rl import loop, session
    from r1_megatron.train.weights import export_hf

    run = session.RunState(job)  # resumes from checkpoint.dir/latest, else loads checkpoint.load
    start, hf = run.trainer.step, d / "hf"
    try:
        base = _base_accuracy(run, d) if spec.own_eval else None
        metrics = loop.train(job, run=run)
        record = {"outputs": {"checkpoint": ctx.rel(run.ckpt_root), "hf": ctx.rel(hf)}, "start_step": start,
                  "steps": run.trainer.step, "final_reward": metrics.get("reward/mean")}
        if spec.own_eval:
            record.update(base_accuracy=base, final_accuracy=run.evaluate())
            record["pass_at_1"] = record["final_accuracy"]
        export_hf(run.trainer, hf)  # collective; rank 0 writes
        if spec.eval_prompts:
            run.refit()  # the engine then holds the final weights (canary-checked)
            report = evaluate_hf(hf, job, spec.eval_prompts, spec.eval_k, run.engine)
            record["pass_at_1"] = report["pass_at_1"]
    finally:
        run.close()
    return record


def _base_accuracy(run, d: Path) -> float:
    """own_eval: the policy's held-out pass@1 before GRPO (RunState.evaluate), kept in
    base_accuracy.json so that a resumed run reports what the base scored, not its current policy."""
    from r1_megatron.train.metrics import is_rank0

    saved = d / "base_accuracy.json"
    if run.trainer.step == 0:
        acc = run.evaluate()
        if is_rank0():
            saved.write_text(json.dumps({"base_accuracy": acc}))
    elif saved.is_file():
        acc = json.loads(saved.read_text())["base_accuracy"]
    else:
        raise ConfigError(f"{d} holds a GRPO run at step {run.trainer.step} but not its base's accuracy "
                          f"({saved.name}); remove {d} to run it again")
    if is_rank0():
        samples = run.cfg.rl.eval_samples
        print(f"base held-out accuracy (pass@1, {samples} samples): {acc:.3f}", flush=True)
    return acc


def _sft_on(ctx: Context, spec: StageSpec, job: JobConfig, d: Path, records: list[dict]) -> dict:
    """SFT the stage's model on `records` (logged to the stage dir); the stage record of the result."""
    from r1_megatron.train.sft import train_sft

    logger, log = _sft_log(job, d, spec.steps)
    try:
        trainer, result = train_sft(job, records, spec.steps, spec.pairs_per_step, log)
    finally:
        logger.close()
    return _trained(ctx, trainer, result, spec, job, d)


def _rejection(ctx: Context, spec: StageSpec, job: JobConfig, d: Path, source: dict | None) -> dict:
    from r1_megatron.distill.traces import sample_traces

    records, counts = sample_traces(spec, job, _teacher_hf(ctx, source, job), d)
    out = _sft_on(ctx, spec, job, d, records)
    out["outputs"]["traces"] = ctx.rel(d / "traces.jsonl")
    return {**out, "traces": counts}


def _distill(ctx: Context, spec: StageSpec, job: JobConfig, d: Path, source: dict | None) -> dict:
    from r1_megatron.distill.traces import sample_traces

    if spec.traces:
        from r1_megatron.data.jsonl import read_jsonl

        path = ctx.path(ctx.records[spec.traces], "traces")
        records, counts = read_jsonl(path, "sft", strict=True)[0], {"reused": str(path)}
    else:
        records, counts = sample_traces(spec, job, _teacher_hf(ctx, source, job), d)
    out = _sft_on(ctx, spec, job, d, records)
    if not spec.traces:
        out["outputs"]["traces"] = ctx.rel(d / "traces.jsonl")
    return {**out, "traces": counts, "student": spec.student}


def _eval(ctx: Context, spec: StageSpec, job: JobConfig, d: Path, source: dict | None) -> dict:
    n = spec.eval_prompts or job.data.num_eval
    student = ctx.student()
    reports = {}
    if source is not None or spec.init == "base":
        reports["teacher"] = evaluate_hf(_teacher_hf(ctx, source, job), job, n, spec.eval_k, keep_text=True)
    if student is not None:
        reports["student"] = evaluate_hf(ctx.path(student, "hf"), job, n, spec.eval_k, keep_text=True)
    (d / "eval.json").write_text(json.dumps(reports, indent=1, ensure_ascii=False) + "\n")
    out = {"outputs": {"eval": ctx.rel(d / "eval.json")}}
    for role, report in reports.items():
        out[f"{role}_pass_at_1"] = report["pass_at_1"]
        out[f"{role}_cons_at_k"] = report["cons_at_k"]
    out["teacher"] = None if source is None else source["name"]
    out["student"] = None if student is None else student["name"]
    return out


# ------------------------------------------------------------------------------------ eval


def evaluate_hf(hf_dir: Path, job: JobConfig, n: int, k: int, engine=None, keep_text: bool = False) -> dict:
    """pass@1 / cons@k of an HF checkpoint on n held-out prompts (eval/runner.py; seeded sampling, so
    every stage is measured on the same prompts the same way)."""
    from r1_megatron.data.tasks import make_items
    from r1_megatron.data.tokenizer import job_tokenizer
    from r1_megatron.eval.runner import eval_sampling, evaluate
    from r1_megatron.data.tasks import task_kwargs

    items = make_items(n=n, **task_kwargs(job, "eval"))
    own = engine is None
    if own:
        from r1_megatron.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(hf_dir, job.rollout)
    try:
        sampling = eval_sampling(job.rollout.max_new_tokens)
        return evaluate(engine, job_tokenizer(job), items, k=k, sampling=sampling,
                        reward_cfg=job.reward, chat=job.data.chat, keep_text=keep_text)
    finally:
        if own:
            engine.close()
