"""`r1m demo` is configs/demo_pipeline.yaml run by the pipeline runner, and its stages train exactly
what the hand-written demo trained before it (cli/demo.py + demo.py up to commit 770491a).

Guarantees, for the default command, `seed=3 sft_steps=5 rl.steps=2` and `sft_lr=5e-4
data.sft_pairs_per_step=8`:
- the SFT base's job config equals the hand-written demo's SFT job field for field, but for where it
  writes (checkpoint.dir, logging.run_dir: DIR/sft_base/ instead of DIR/sft_checkpoints and DIR),
  with the same steps and pairs per step;
- the GRPO job config equals the hand-written demo's field for field, but for checkpoint.dir
  (DIR/checkpoints spelt out; the old job left it empty, which RunState reads as the same
  DIR/checkpoints) and checkpoint.load (the SFT base's checkpoints, which moved with it);
- `sft_steps=` / `sft_lr=` reach the SFT stage only, everything else every stage; a bad value is a
  one-line ConfigError.
"""

import dataclasses
from pathlib import Path

import pytest

from r1_megatron.cli.demo import PIPELINE, pipeline_overrides
from r1_megatron.config.loader import CONFIGS_DIR, ConfigError, load_config
from r1_megatron.pipeline.spec import load_pipeline
from r1_megatron.pipeline.stages import Context, stage_job

OUT = Path("runs/demo")


def hand_written(argv: list[str], out: Path):
    """The SFT job, its (steps, pairs per step), and the GRPO job, as the hand-written demo built them."""
    sft_steps, sft_lr, rest = 400, 2e-3, []
    for a in argv:
        if a.startswith("sft_steps="):
            sft_steps = int(a.split("=", 1)[1])
        elif a.startswith("sft_lr="):
            sft_lr = float(a.split("=", 1)[1])
        else:
            rest.append(a)
    cfg = load_config(CONFIGS_DIR / "demo_cpu.yaml", [f"logging.run_dir={out}", *rest])
    optim = dataclasses.replace(cfg.optim, lr=sft_lr, warmup_steps=min(20, sft_steps // 10),
                                decay_style="cosine", total_steps=sft_steps)
    base_root = str(out / "sft_checkpoints")
    sft = dataclasses.replace(cfg, optim=optim, checkpoint=dataclasses.replace(cfg.checkpoint, dir=base_root))
    grpo = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=base_root))
    return sft, (sft_steps, cfg.data.sft_pairs_per_step), grpo


def moved(job, **where):
    """`job` with its checkpoint.dir / checkpoint.load / logging.run_dir set as given."""
    ckpt = {k: v for k, v in where.items() if k in ("dir", "load")}
    job = dataclasses.replace(job, checkpoint=dataclasses.replace(job.checkpoint, **ckpt))
    if "run_dir" in where:
        job = dataclasses.replace(job, logging=dataclasses.replace(job.logging, run_dir=where["run_dir"]))
    return job


@pytest.mark.parametrize("argv", [[], ["seed=3", "sft_steps=5", "rl.steps=2"],
                                  ["sft_lr=5e-4", "data.sft_pairs_per_step=8"]])
def test_demo_stages_train_what_the_hand_written_demo_trained(argv):
    old_sft, old_schedule, old_grpo = hand_written(argv, OUT)
    sft, grpo = load_pipeline(PIPELINE, pipeline_overrides(argv)).stages
    ctx = Context(OUT)
    new_sft = stage_job(ctx, sft)
    ctx.add({"name": sft.spec.name, "kind": "sft", "outputs": {"checkpoint": "sft_base/checkpoints"}})
    new_grpo = stage_job(ctx, grpo)

    base_root = str(OUT / "sft_base" / "checkpoints")
    assert new_sft == moved(old_sft, dir=base_root, run_dir=str(OUT / "sft_base"))
    assert (sft.spec.steps, sft.spec.pairs_per_step) == old_schedule
    assert new_grpo == moved(old_grpo, dir=str(OUT / "checkpoints"), load=base_root)
    assert new_grpo.logging.run_dir == str(OUT) and grpo.spec.own_eval


def test_bad_demo_value_is_a_config_error():
    with pytest.raises(ConfigError, match="sft_steps: expected a number, got 'many'"):
        pipeline_overrides(["sft_steps=many"])
