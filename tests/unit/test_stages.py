"""Pipeline configs (r1_megatron/pipeline/spec.py, pipeline/stages.py) are checked before anything runs.

Guarantees:
- a bad pipeline (unknown stage kind, missing base/stages/name/kind/student, a field that does not
  apply to the kind, a misspelt field, a bad job override inside a stage, a duplicate name, an `init`
  or `traces` that names no earlier stage, a non-dense student, a command-line override for a stage
  that does not exist) is a one-line ConfigError naming the stage and the key, and `r1m pipeline`
  prints that one line and exits 2;
- job configs resolve with the precedence base < pipeline overrides < stage overrides < command
  line; a grpo stage's `steps` is its rl.steps; a distill stage gets the student card alone and no
  teacher checkpoint;
- a stage's done.json is honoured only for the config it was made with, less what a resumed run may
  change (steps, reporting, layout), and a grpo stage done with fewer steps than asked runs again
  (it resumes); the refusal names the changed keys with both values;
- under torchrun only stages that run on every rank (sft, grpo without eval_prompts) are taken;
- the shipped recipes (configs/r1_pipeline_demo.yaml, configs/r1_zero_demo.yaml) load.
"""

import json
import textwrap

import pytest

from r1_megatron.config.loader import ConfigError, load_config
from r1_megatron.cli.pipeline import main
from r1_megatron.pipeline.spec import load_pipeline
from r1_megatron.pipeline.stages import Context

GOOD = """
base: demo_cpu
overrides: {optim.lr: 2.0e-4, data: {digits: 1}}
stages:
  - {name: cold, kind: sft, steps: 3, overrides: {data.sft_wrong_fraction: 0.25}}
  - {name: rl, kind: grpo, steps: 2, overrides: {rl: {group_size: 4}}}
  - {name: rs, kind: rejection_sampling, steps: 2, prompts: 8, rejection: {k: 2}}
  - {name: student, kind: distill, student: qwen2_tiny, steps: 2, overrides: {optim.lr: 1.0e-3}}
  - {name: eval, kind: eval, eval_prompts: 4}
"""


def _write(tmp_path, text: str):
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _error(tmp_path, text: str, overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        load_pipeline(_write(tmp_path, text), list(overrides))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_precedence_and_per_kind_resolution(tmp_path):
    p = load_pipeline(_write(tmp_path, GOOD), ["optim.clip_grad=0.5", "stages.rl.steps=5"])
    cold, rl, rs, student, _ = p.stages
    assert cold.job.optim.lr == 2e-4 and cold.job.data.digits == 1  # pipeline overrides reach every stage
    base = load_config("demo_cpu")
    assert base.data.sft_wrong_fraction != 0.25 and rs.job.data.sft_wrong_fraction == base.data.sft_wrong_fraction
    assert cold.job.data.sft_wrong_fraction == 0.25  # a stage's own overrides stay in that stage
    assert rl.job.rl.steps == 5 and rl.job.rl.group_size == 4  # stages.<name>.steps from the command line
    assert all(s.job.optim.clip_grad == 0.5 for s in p.stages)
    assert rs.spec.rejection.k == 2
    assert student.job.model.arch == "qwen2" and student.job.model.num_experts == 0
    assert student.job.optim.lr == 1e-3 and student.job.checkpoint.load == ""
    assert cold.job.model.card == "tiny_moe"
    assert len({s.digest for s in p.stages}) == 5
SFT1 = "base: demo_cpu\nstages: [{name: a, kind: sft, steps: 1}"


@pytest.mark.parametrize("text, expected", [
    ("stages: [{name: a, kind: sft, steps: 1}]", "missing required key 'base'"),
    ("base: demo_cpu", "missing required key 'stages'"),
    ("base: demo_cpu\nstages: []", "stages: expected a non-empty list"),
    ("base: nosuch\nstages: [{name: a, kind: sft, steps: 1}]", "base: no job config 'nosuch'"),
    ("base: demo_cpu\nstagez: []\nstages: []", "unknown key 'stagez'"),
    ("base: demo_cpu\nstages: [{name: a, kind: dpo}]", "stages[0]: kind 'dpo' is not one of"),
    ("base: demo_cpu\nstages: [{kind: sft, steps: 1}]", "stages[0]: missing required field 'name'"),
    ("base: demo_cpu\nstages: [{name: a, steps: 1}]", "stages[0]: missing required field 'kind'"),
    ("base: demo_cpu\nstages: [{name: a, kind: sft}]", "stages[0] (a): steps must be >= 1 for kind sft"),
    ("base: demo_cpu\nstages: [{name: a, kind: sft, stepz: 3}]",
     "stages[0] (a): unknown key 'stepz'; did you mean 'steps'?"),
    ("base: demo_cpu\nstages: [{name: a, kind: grpo, student: qwen2_tiny}]",
     "stages[0] (a): field 'student' does not apply to kind grpo"),
    (f"{SFT1}, {{name: d, kind: distill, steps: 1}}]",
     "stages[1] (d): missing required field 'student'"),
    (f"{SFT1}, {{name: d, kind: distill, steps: 1, student: tiny_moe}}]",
     "stages[1] (d): student 'tiny_moe' is a deepseek_v3 card"),
    ("base: demo_cpu\nstages: [{name: a, kind: sft, steps: 1, overrides: {rl.stepz: 3}}]",
     "stages[0] (a): unknown key 'rl.stepz'; did you mean 'rl.steps'?"),
    ("base: demo_cpu\nstages: [{name: a, kind: sft, steps: 1, overrides: {rl: {group_size: 1}}}]",
     "stages[0] (a): rl.group_size(1) must be >= 2"),
    (f"{SFT1}, {{name: a, kind: grpo}}]", "duplicate stage name 'a'"),
    ("base: demo_cpu\nstages: [{name: a, kind: grpo, init: b}, {name: b, kind: sft, steps: 1}]",
     "stages[0] (a): init 'b' is not an earlier sft/grpo/rejection_sampling stage"),
    (f"{SFT1}, {{name: d, kind: distill, steps: 1, student: qwen2_tiny, traces: a}}]",
     "stages[1] (d): traces 'a' is not an earlier rejection_sampling/distill stage"),
    ("base: demo_cpu\nstages: [{name: r, kind: rejection_sampling, steps: 1}]",
     "stages[0] (r): kind rejection_sampling samples a policy, but no sft/grpo/rejection_sampling stage"),
    ("base: demo_cpu\nstages: [{name: e, kind: eval}]", "stages[0] (e): nothing to evaluate"),
    ("base: demo_cpu\nstages: [{name: a, kind: sft, steps: 1, rejection: {k: 2}}]",
     "field 'rejection' does not apply to kind sft"),
    (f"{SFT1}, {{name: r, kind: rejection_sampling, steps: 1, rejection: {{k: 0}}}}]",
     "stages[1] (r): rejection.k must be >= 1, got 0"),
    ("base: demo_cpu\nstages: [{name: a, kind: sft, steps: 1, dir: ../x}]",
     "stages[0] (a): dir must be '.' or a relative path inside the pipeline directory"),
    (f"{SFT1}, {{name: g, kind: grpo, dir: a}}]", "stages[1] (g): dir 'a' is an earlier stage's directory"),
    (f"{SFT1}, {{name: g, kind: grpo, own_eval: true, eval_prompts: 4}}]",
     "stages[1] (g): own_eval and eval_prompts both measure the stage"),
    ("base: demo_cpu\nstages: [{name: a, kind: sft, steps: 1, own_eval: true}]",
     "field 'own_eval' does not apply to kind sft"),
])
def test_bad_pipeline_is_one_line_naming_the_key(tmp_path, text, expected):
    assert expected in _error(tmp_path, text)


def test_override_for_a_missing_stage(tmp_path):
    message = _error(tmp_path, GOOD, ["stages.nosuch.steps=2"])
    assert "no stage named 'nosuch'" in message


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    path = _write(tmp_path, "base: demo_cpu\nstages: [{name: a, kind: ppo}]")
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("r1m pipeline: ") and "kind 'ppo'" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_done_marker_is_tied_to_the_config(tmp_path):
    first = load_pipeline(_write(tmp_path, GOOD)).stages[0]
    changed = load_pipeline(_write(tmp_path, GOOD), ["stages.cold.steps=4"]).stages[0]
    ctx = Context(tmp_path / "out")
    assert ctx.completed(first) is None
    ctx.stage_dir("cold").mkdir(parents=True)
    (ctx.stage_dir("cold") / "done.json").write_text(json.dumps({"name": "cold", "digest": first.digest}))
    assert ctx.completed(first)["name"] == "cold"
    with pytest.raises(ConfigError, match="stage 'cold' was completed with a different config"):
        ctx.completed(changed)


def test_done_marker_ignores_what_a_resume_may_change(tmp_path):
    """rl.steps, reporting and layout keep every digest; a grpo stage asked for more steps resumes,
    and the stages after it (whose input grows) are stale."""
    first = load_pipeline(_write(tmp_path, GOOD)).stages
    same = load_pipeline(_write(tmp_path, GOOD), ["rl.eval_every=7", "logging.tensorboard=false",
                                                  "parallel.tp=2", "stages.cold.overrides.rl.steps=9"]).stages
    assert [s.digest for s in same] == [s.digest for s in first]
    more = load_pipeline(_write(tmp_path, GOOD), ["stages.rl.steps=5"]).stages
    assert [s.digest for s in more[:2]] == [s.digest for s in first[:2]]
    assert more[2].digest != first[2].digest
    ctx = Context(tmp_path / "out")
    ctx.stage_dir("rl").mkdir(parents=True)
    (ctx.stage_dir("rl") / "done.json").write_text(json.dumps({"name": "rl", "digest": first[1].digest,
                                                               "steps": 2}))
    assert ctx.completed(first[1])["steps"] == 2
    assert ctx.completed(more[1]) is None  # 2 of 5 steps done: run it, from its checkpoint


def test_refusal_names_the_changed_keys(tmp_path):
    from r1_megatron.config import save_resolved
    from r1_megatron.pipeline.stages import stage_job

    first = load_pipeline(_write(tmp_path, GOOD)).stages[0]
    ctx = Context(tmp_path / "out")
    save_resolved(stage_job(ctx, first), ctx.stage_dir("cold"))
    (ctx.stage_dir("cold") / "done.json").write_text(json.dumps({"name": "cold", "digest": first.digest}))
    with pytest.raises(ConfigError, match="seed: 1234 -> 5"):
        ctx.completed(load_pipeline(_write(tmp_path, GOOD), ["seed=5"]).stages[0])


def test_torchrun_takes_only_stages_that_run_on_every_rank(tmp_path, monkeypatch):
    from r1_megatron.pipeline.run import check_world_size

    monkeypatch.setenv("WORLD_SIZE", "4")
    check_world_size(load_pipeline("configs/demo_pipeline.yaml"))
    with pytest.raises(ConfigError, match="stage 'rs': kind rejection_sampling runs in one process"):
        check_world_size(load_pipeline(_write(tmp_path, GOOD)))


@pytest.mark.parametrize("name", ["r1_pipeline_demo", "r1_zero_demo"])
def test_shipped_recipes_load(name):
    p = load_pipeline(f"configs/{name}.yaml")
    kinds = [s.spec.kind for s in p.stages]
    assert kinds[-1] == "eval" and "grpo" in kinds
    if name == "r1_pipeline_demo":
        assert kinds == ["sft", "grpo", "rejection_sampling", "grpo", "distill", "eval"]
        assert p.stages[4].job.model.card == "qwen2_tiny"
