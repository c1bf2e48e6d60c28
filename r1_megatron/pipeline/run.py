"""`r1m pipeline CONFIG [--out DIR] [key=value ...]`: the R1 recipe as stages (docs/architecture.md).

A pipeline YAML names a job config every stage starts from, and the stages:

    base: demo_cpu                  # a job config (configs/<name>.yaml or a path, relative to this file)
    overrides: {rl.kl_coef: 0.001}  # optional: job-config overrides for every stage
    stages:
      - {name: cold_start_sft, kind: sft, steps: 60, overrides: {data.sft_wrong_fraction: 0.5}}
      - {name: reasoning_rl, kind: grpo, steps: 10}
      - {name: rejection_sft, kind: rejection_sampling, prompts: 128, steps: 40, rejection: {k: 4}}
      - {name: all_scenario_rl, kind: grpo, steps: 10, overrides: {reward.weights: {accuracy: 1.0}}}
      - {name: distill, kind: distill, student: qwen2_tiny, prompts: 256, steps: 100}
      - {name: eval, kind: eval, eval_prompts: 64}

Each stage reads the output of the stage before it (pipeline/stages.py says which output, per kind) and
writes DIR/<name>/ (or DIR/<dir>/ for a stage with a `dir`; "." is DIR itself), ending with done.json.
A re-run skips every stage whose done.json is there and refuses, naming the stage and the keys, when
that stage's resolved config has changed since in anything but what a resumed run may change (steps,
reporting, layout: config/loader.py RESUMABLE). A grpo stage done with fewer steps than its rl.steps
now asks resumes, as does an interrupted stage, from its own checkpoints. DIR/report.json lists the
stages with their held-out pass@1 and the teacher's and the student's.

Command-line overrides `key=value` apply to every stage's job config; `stages.<name>.<field>=value`
changes one stage (e.g. `stages.reasoning_rl.steps=2`, `stages.base.overrides.optim.lr=1e-3`).

Under torchrun every rank runs every stage (a pipeline of sft and grpo stages, measured by grpo's
own_eval if at all: the kinds that run at any layout). All ranks take the same decisions, from the
done.json files as they stand when the run starts; rank 0 alone writes the records and the report.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from r1_megatron.config.loader import ConfigError
from r1_megatron.train.metrics import is_rank0


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def run(pipeline, out: Path) -> dict:
    """Run the stages not yet done, in order; returns the report (also written to out/report.json)."""
    from r1_megatron.pipeline.stages import Context, run_stage

    check_world_size(pipeline)
    ctx = Context(out)
    done = [ctx.completed(stage) for stage in pipeline.stages]  # before anything is written or run
    writer = is_writer()
    out.mkdir(parents=True, exist_ok=True)
    if writer:
        (out / "pipeline.resolved.yaml").write_text(yaml.safe_dump(pipeline.describe(), sort_keys=False))
    report: dict = {"source": pipeline.source, "stages": []}
    started = time.time()
    for stage, record in zip(pipeline.stages, done):
        if record is None:
            _say(writer, f"[pipeline] stage {stage.spec.name} ({stage.spec.kind})")
            record = run_stage(ctx, stage)
            record["status"] = "ran"
            if writer:
                write_json_atomic(ctx.stage_dir(stage.spec.name, stage.spec.dir) / "done.json", record)
        else:
            _say(writer, f"[pipeline] stage {stage.spec.name} already done, skipped")
            record = {**record, "status": "skipped"}
        ctx.add(record)
        report["stages"].append(record)
        report.update(_headline(report["stages"]), seconds=round(time.time() - started, 1))
        if writer:
            write_json_atomic(out / "report.json", report)
    return report


# Kinds that run under torchrun: their loops run at any layout. The others sample a teacher with an
# engine of their own (world size 1), as does a stage's eval_prompts measurement.
MULTI_RANK_KINDS = ("sft", "grpo")


def check_world_size(pipeline) -> None:
    """At WORLD_SIZE > 1 every stage must run on every rank (MULTI_RANK_KINDS, no eval_prompts)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return
    for stage in pipeline.stages:
        if stage.spec.kind not in MULTI_RANK_KINDS or stage.spec.eval_prompts:
            what = f"kind {stage.spec.kind}" if stage.spec.kind not in MULTI_RANK_KINDS else "eval_prompts"
            raise ConfigError(f"stage '{stage.spec.name}': {what} runs in one process, not at world size "
                              f"{world}; run this pipeline without torchrun (or measure grpo with own_eval)")


def _say(writer: bool, line: str) -> None:
    if writer:
        print(line, flush=True)


def is_writer() -> bool:
    """Rank 0 of the job, also before a stage has set up the process group (torchrun's RANK)."""
    return is_rank0() and os.environ.get("RANK", "0") == "0"


def _headline(stages: list[dict]) -> dict:
    """teacher_pass_at_1 / student_pass_at_1: the eval stage's, else the last measured of each role."""
    out = {"teacher_pass_at_1": None, "student_pass_at_1": None}
    for record in stages:
        if record["kind"] == "eval":
            out = {"teacher_pass_at_1": record.get("teacher_pass_at_1"),
                   "student_pass_at_1": record.get("student_pass_at_1")}
        elif record.get("pass_at_1") is not None and record.get("role") in ("teacher", "student"):
            out[f"{record['role']}_pass_at_1"] = record["pass_at_1"]
    return out
