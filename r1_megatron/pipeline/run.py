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
writes DIR/<name>/, ending with DIR/<name>/done.json. A re-run skips every stage whose done.json is
there (and refuses, naming the stage, when that stage's resolved config has changed since), and an
interrupted stage resumes from its own checkpoints. DIR/report.json lists the stages with their
held-out pass@1 and the teacher's and the student's.

Command-line overrides `key=value` apply to every stage's job config; `stages.<name>.<field>=value`
changes one stage (e.g. `stages.reasoning_rl.steps=2`). The pipeline runs in one process (world size 1).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def run(pipeline, out: Path) -> dict:
    """Run the stages not yet done, in order; returns the report (also written to out/report.json)."""
    from r1_megatron.pipeline.stages import Context, run_stage

    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.resolved.yaml").write_text(yaml.safe_dump(pipeline.describe(), sort_keys=False))
    ctx = Context(out)
    report: dict = {"source": pipeline.source, "stages": []}
    started = time.time()
    for stage in pipeline.stages:
        record = ctx.completed(stage)
        if record is None:
            print(f"[pipeline] stage {stage.spec.name} ({stage.spec.kind})", flush=True)
            record = run_stage(ctx, stage)
            record["status"] = "ran"
            write_json_atomic(ctx.stage_dir(stage.spec.name) / "done.json", record)
        else:
            print(f"[pipeline] stage {stage.spec.name} already done, skipped", flush=True)
            record = {**record, "status": "skipped"}
        ctx.add(record)
        report["stages"].append(record)
        report.update(_headline(report["stages"]), seconds=round(time.time() - started, 1))
        write_json_atomic(out / "report.json", report)
    return report


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
