"""The stages of the R1 recipe (SPEC §8) and what each one reads and writes.

Every stage writes DIR/<name>/ and returns a record (kept in done.json) naming its outputs, relative
to DIR. Kinds:
- sft: SFT of the policy on the built-in task's worked solutions (data.sft_examples pairs, a share
  data.sft_wrong_fraction of them wrong on purpose) or on data.train_file. Starts from the previous
  policy stage's checkpoint (the first one from the base job's checkpoint.load, or the random init).
  Writes checkpoints/ and hf/.
- grpo: the GRPO loop (rl/loop.py) from the previous policy's weights (its HF export), which are
  also the frozen reference. Writes checkpoints/ and hf/. R1-Zero is a pipeline whose only training stage is this one.
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
job's checkpoint.load. With `eval_prompts` > 0 a training stage also measures its held-out pass@1.

Departure from DeepSeek-R1: its stage-3 SFT retrains the *base* model on the rejection-sampled set;
here it continues from the RL policy by default (set `init: <cold-start stage>` or `base` for R1's
choice). The tiny models need every step they get.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from r1_megatron.config.loader import ConfigError, from_dict, parse_overrides, resolve_dict
from r1_megatron.config.schema import JobConfig
from r1_megatron.distill.rejection import RejectionConfig

KINDS = ("sft", "grpo", "rejection_sampling", "distill", "eval")
POLICY_KINDS = ("sft", "grpo", "rejection_sampling")  # stages whose output is the next policy
SAMPLING_KINDS = ("grpo", "rejection_sampling", "distill", "eval")  # need a policy to start or sample from
_COMMON = {"name", "kind", "overrides", "init", "eval_prompts", "eval_k"}
_KIND_FIELDS = {
    "sft": {"steps", "pairs_per_step"},
    "grpo": {"steps"},
    "rejection_sampling": {"steps", "pairs_per_step", "prompts", "rejection"},
    "distill": {"steps", "pairs_per_step", "prompts", "rejection", "student", "traces"},
    "eval": set(),
}


@dataclass
class StageSpec:
    """One stage of a pipeline YAML (`overrides` is read separately: job-config changes for this stage)."""

    name: str = ""  # unique, names DIR/<name>/
    kind: Literal["sft", "grpo", "rejection_sampling", "distill", "eval"] = "sft"  # what the stage does
    init: str = ""  # policy to start/sample from: "" the previous policy stage, "base", or an earlier stage
    steps: int = 0  # optimizer steps (sft, rejection_sampling, distill); grpo: rl.steps (0: the job's)
    pairs_per_step: int = 32  # SFT pairs per optimizer step
    prompts: int = 64  # train prompts sampled (rejection_sampling, distill)
    rejection: RejectionConfig = field(default_factory=RejectionConfig)  # what sampling keeps
    student: str = ""  # distill: the dense student's model card
    traces: str = ""  # distill: reuse this earlier stage's traces.jsonl instead of sampling the teacher
    eval_prompts: int = 0  # held-out prompts for pass@1 after the stage (eval: default data.num_eval)
    eval_k: int = 4  # samples per eval prompt


@dataclass
class Stage:
    """A checked stage: its spec, its resolved job config, and the digest done.json records."""

    spec: StageSpec
    job: JobConfig
    digest: str


@dataclass
class Pipeline:
    source: str
    stages: list[Stage]

    def describe(self) -> dict:
        return {"source": self.source, "stages": [
            {"spec": dataclasses.asdict(s.spec), "job": dataclasses.asdict(s.job)} for s in self.stages]}


def _nest(overrides: dict, where: str) -> dict:
    """{'rl.steps': 2, 'optim': {'lr': 1e-3}} -> {'rl': {'steps': 2}, 'optim': {'lr': 1e-3}}."""
    out: dict = {}
    for key, value in overrides.items():
        node = out
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: '{key}' goes through '{part}', which is not a section")
        leaf = _nest(value, where) if isinstance(value, dict) else value
        node[parts[-1]] = merge(node[parts[-1]], leaf) if isinstance(node.get(parts[-1]), dict) else leaf
    return out


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, section by section."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _spec(raw: object, where: str) -> tuple[StageSpec, dict]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with name and kind, got {raw!r}")
    for key in ("name", "kind"):
        if key not in raw:
            raise ConfigError(f"{where}: missing required field '{key}'")
    if raw["kind"] not in KINDS:
        raise ConfigError(f"{where}: kind {raw['kind']!r} is not one of {list(KINDS)}")
    where = f"{where} ({raw['name']})"
    extra = sorted(set(raw) - _COMMON - _KIND_FIELDS[raw["kind"]])
    if extra and extra[0] in {f.name for f in dataclasses.fields(StageSpec)}:
        raise ConfigError(f"{where}: field '{extra[0]}' does not apply to kind {raw['kind']}")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: overrides: expected a mapping, got {type(overrides).__name__}")
    try:
        spec = from_dict(StageSpec, {k: v for k, v in raw.items() if k != "overrides"})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:  # RejectionConfig's own range checks
        raise ConfigError(f"{where}: {e}") from None
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", spec.name):
        raise ConfigError(f"{where}: name must be letters, digits, '_', '.' or '-'")
    if spec.kind in ("sft", "rejection_sampling", "distill") and spec.steps < 1:
        raise ConfigError(f"{where}: steps must be >= 1 for kind {spec.kind}, got {spec.steps}")
    if spec.kind == "distill" and not spec.student:
        raise ConfigError(f"{where}: missing required field 'student' (a dense model card, e.g. qwen2_tiny)")
    lows = (("pairs_per_step", 1), ("prompts", 1), ("eval_prompts", 0), ("eval_k", 1), ("steps", 0))
    for name, low in lows:
        if getattr(spec, name) < low:
            raise ConfigError(f"{where}: {name} must be >= {low}, got {getattr(spec, name)}")
    return spec, _nest(overrides, f"{where}: overrides")


def _job(base: dict, layers: list[dict], spec: StageSpec, own: dict, where: str) -> JobConfig:
    from r1_megatron.config.validate import validate

    data = base
    for layer in layers:
        data = merge(data, layer)
    if spec.kind == "distill":
        # The student is its own network: none of the teacher's model fields, and no teacher weights.
        data = {**data, "model": {"card": spec.student, **own.get("model", {})}}
        data["checkpoint"] = {**data.get("checkpoint", {}), "load": own.get("checkpoint", {}).get("load", "")}
    if spec.kind == "grpo" and spec.steps:
        data = merge(data, {"rl": {"steps": spec.steps}})
    try:
        job = from_dict(JobConfig, resolve_dict(data))
        validate(job)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if spec.kind == "distill" and job.model.arch not in ("qwen2", "llama"):
        raise ConfigError(f"{where}: student '{spec.student}' is a {job.model.arch} card; "
                          "a student is qwen2 or llama")
    return job


def build_pipeline(base: dict, shared: dict, stages_raw: object, common: list[str],
                   per_stage: dict[str, dict], source: str) -> Pipeline:
    """Check the stages and resolve each one's job config (base < shared < stage < command line)."""
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{source}: stages: expected a non-empty list of stages")
    names = [s.get("name") for s in stages_raw if isinstance(s, dict)]
    unknown = sorted(set(per_stage) - set(names))
    if unknown:
        raise ConfigError(f"override stages.{unknown[0]}.*: no stage named '{unknown[0]}' (stages: {names})")
    cli = parse_overrides(common)
    stages: list[Stage] = []
    for i, raw in enumerate(stages_raw):
        if isinstance(raw, dict) and raw.get("name") in per_stage:
            raw = merge(raw, per_stage[raw["name"]])
        spec, own = _spec(raw, f"stages[{i}]")
        where = f"stages[{i}] ({spec.name})"
        earlier = {s.spec.name: s.spec.kind for s in stages}
        if spec.name in earlier:
            raise ConfigError(f"{where}: duplicate stage name '{spec.name}'")
        if spec.init not in ("", "base") and earlier.get(spec.init) not in POLICY_KINDS:
            raise ConfigError(f"{where}: init '{spec.init}' is not an earlier "
                              "sft/grpo/rejection_sampling stage")
        if spec.kind == "distill" and spec.init == "base":
            raise ConfigError(f"{where}: init: base does not apply to distill (the teacher is a policy "
                              "stage; or reuse a traces set with traces: <stage>)")
        if spec.traces and earlier.get(spec.traces) not in ("rejection_sampling", "distill"):
            raise ConfigError(f"{where}: traces '{spec.traces}' is not an earlier "
                              "rejection_sampling/distill stage")
        has_policy = any(k in POLICY_KINDS for k in earlier.values())
        if spec.kind in ("rejection_sampling", "distill") and not spec.traces and spec.init != "base" \
                and not has_policy:
            raise ConfigError(f"{where}: kind {spec.kind} samples a policy, but no "
                              "sft/grpo/rejection_sampling "
                              "stage comes before it (or set init: base with an HF checkpoint.load)")
        has_student = "distill" in earlier.values()
        if spec.kind == "eval" and not (has_policy or has_student or spec.init == "base"):
            raise ConfigError(f"{where}: nothing to evaluate: no policy or distill stage comes before it")
        job = _job(base, [_nest(shared, "overrides"), own, cli], spec, own, where)
        # Chained over the stages before it: a changed input makes every later done.json stale too.
        chain = stages[-1].digest if stages else ""
        blob = json.dumps([chain, dataclasses.asdict(spec), dataclasses.asdict(job)], sort_keys=True,
                          default=str)
        stages.append(Stage(spec, job, hashlib.sha256(blob.encode()).hexdigest()[:16]))
    return Pipeline(source, stages)


# ------------------------------------------------------------------------------------ running


class Context:
    """The pipeline directory and the records of the stages done so far (paths relative to it)."""

    def __init__(self, out: Path):
        self.out = out
        self.records: dict[str, dict] = {}

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def path(self, record: dict, output: str) -> Path:
        return self.out / record["outputs"][output]

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.out))

    def completed(self, stage: Stage) -> dict | None:
        """The stage's done.json record, or None; a record made under another config is an error."""
        done = self.stage_dir(stage.spec.name) / "done.json"
        if not done.is_file():
            return None
        record = json.loads(done.read_text())
        if record.get("digest") != stage.digest:
            raise ConfigError(f"stage '{stage.spec.name}' was completed with a different config "
                              f"({done}); remove {done.parent} to run it again")
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


def run_stage(ctx: Context, stage: Stage) -> dict:
    """Run one stage to completion (resuming its own checkpoints); returns its done.json record."""
    spec, d = stage.spec, ctx.stage_dir(stage.spec.name)
    d.mkdir(parents=True, exist_ok=True)
    source = ctx.policy(spec.init)
    # GRPO starts from the previous policy's HF export (weights only, the same file vLLM serves): RunState
    # then begins at step 0 with a fresh optimizer. SFT stages read the weights of the checkpoint itself.
    load = None if source is None else str(ctx.path(source, "hf" if spec.kind == "grpo" else "checkpoint"))
    job = _in_stage_dirs(stage.job, d, load if spec.kind != "distill" else None)
    from r1_megatron.config import save_resolved

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
    from r1_megatron.distill.student import export_hf

    hf = export_hf(trainer, d / "hf")
    record = {"outputs": {"checkpoint": ctx.rel(result.checkpoint), "hf": ctx.rel(hf)},
              "start_step": result.start_step, "steps": result.steps, "final_loss": result.loss}
    if spec.eval_prompts:
        record["pass_at_1"] = evaluate_hf(hf, job, spec.eval_prompts, spec.eval_k)["pass_at_1"]
    return record


def _sft_log(job: JobConfig, d: Path):
    from r1_megatron.rl.metrics import MetricsLogger

    logger = MetricsLogger(job.logging, d)

    def log(step: int, metrics: dict) -> None:
        logger.log(step, metrics)
        if step % 25 == 0 or step == 1:
            print(f"  sft step {step} loss {metrics['loss']:.4f}", flush=True)

    return logger, log


def _sft(ctx: Context, spec: StageSpec, job: JobConfig, d: Path, source: dict | None) -> dict:
    from r1_megatron.distill.student import train_sft

    logger, log = _sft_log(job, d)
    try:
        trainer, result = train_sft(job, task_pairs(job), spec.steps, spec.pairs_per_step, log)
    finally:
        logger.close()
    return _trained(ctx, trainer, result, spec, job, d)


def task_pairs(job: JobConfig) -> list[dict]:
    """Cold-start SFT pairs: data.train_file, else data.sft_examples worked solutions of the task."""
    if job.data.train_file:
        from r1_megatron.data.jsonl import read_jsonl

        return read_jsonl(job.data.train_file, "sft", strict=True)[0]
    from r1_megatron.data.tasks import make_items, sft_pairs
    from r1_megatron.rl.prompts import task_kwargs

    items = make_items(n=job.data.sft_examples, **task_kwargs(job, "train"))
    return sft_pairs(items, seed=job.data.seed, wrong_fraction=job.data.sft_wrong_fraction)


def _grpo(ctx: Context, spec: StageSpec, job: JobConfig, d: Path, source: dict | None) -> dict:
    from r1_megatron.distill.student import export_hf
    from r1_megatron.rl import loop, session

    run = session.RunState(job)  # resumes from checkpoint.dir/latest, else loads checkpoint.load
    start = run.trainer.step
    try:
        metrics = loop.train(job, run=run)
        hf = export_hf(run.trainer, d / "hf")
        record = {"outputs": {"checkpoint": ctx.rel(run.ckpt_root), "hf": ctx.rel(hf)}, "start_step": start,
                  "steps": run.trainer.step, "final_reward": metrics.get("reward/mean")}
        if spec.eval_prompts:
            run.refit()  # the engine then holds the final weights (canary-checked)
            report = evaluate_hf(hf, job, spec.eval_prompts, spec.eval_k, run.engine)
            record["pass_at_1"] = report["pass_at_1"]
    finally:
        run.close()
    return record


def _sft_on(ctx: Context, spec: StageSpec, job: JobConfig, d: Path, records: list[dict]) -> dict:
    """SFT the stage's model on `records` (logged to the stage dir); the stage record of the result."""
    from r1_megatron.distill.student import train_sft

    logger, log = _sft_log(job, d)
    try:
        trainer, result = train_sft(job, records, spec.steps, spec.pairs_per_step, log)
    finally:
        logger.close()
    return _trained(ctx, trainer, result, spec, job, d)


def _rejection(ctx: Context, spec: StageSpec, job: JobConfig, d: Path, source: dict | None) -> dict:
    from r1_megatron.distill.student import sample_traces

    records, counts = sample_traces(spec, job, _teacher_hf(ctx, source, job), d)
    out = _sft_on(ctx, spec, job, d, records)
    out["outputs"]["traces"] = ctx.rel(d / "traces.jsonl")
    return {**out, "traces": counts}


def _distill(ctx: Context, spec: StageSpec, job: JobConfig, d: Path, source: dict | None) -> dict:
    from r1_megatron.distill.student import sample_traces

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
    from r1_megatron.rl.prompts import task_kwargs

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
