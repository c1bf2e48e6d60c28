"""One GRPO run of our loop in a process of its own, for test_separate_grpo.py (vLLM state is
process-wide, so each placement gets a fresh process).

    python tests/e2e/_separate_run.py OUT.json MODE key=value ...

MODE: plain (run cfg.rl.steps steps), or kill (save after every step; from the last step's rollout
on, every engine restart fails, then engine 0 is killed mid-rollout: the run must fail with a
RolloutError). Writes {"steps": [[sample, ...] per trained batch], "metrics": rows, "error": str|null,
"checkpoint_equal": bool|null} to OUT.json; a sample is {group, index, response, reward, version}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _rewards import digit_share  # noqa: E402 (importable by the reward pool's workers as _rewards)


def main(out: str, mode: str, overrides: list[str]) -> None:
    import torch

    from r1_megatron.checkpoint import dist as dist_ckpt
    from r1_megatron.config import load_config
    from r1_megatron.reward.pool import RewardPool
    from r1_megatron.rl import loop, session
    from r1_megatron.train.metrics import read_metrics
    from r1_megatron.rollout.engine import RolloutError

    cfg = load_config("configs/demo_cpu.yaml", overrides)
    # The digit-share reward (as test_grpo_learns): from a random init it varies within groups, so
    # the advantages and the loss are not zero.
    run = session.RunState(cfg, pool=RewardPool(cfg.reward, scorer=digit_share, num_workers=1))
    batches: list = []
    rollout = run.rollout

    def recording(*args, **kwargs):
        batch, kept = rollout(*args, **kwargs)
        batches.append(batch)
        if mode == "kill" and len(batches) == cfg.rl.steps - 1:  # the next rollout is the last step's
            (Path(run.engine.model_dir) / "config.json").write_text("{}")  # so a restart cannot load
            _kill_when_generating(run.engine)
        return batch, kept

    run.rollout = recording
    result = {"error": None, "checkpoint_equal": None}
    try:
        loop.train(cfg, run=run)
    except RolloutError as e:
        result["error"] = str(e)
        # The last checkpoint (written before the failed step) loads, and holds the trainer's weights:
        # the failed step never reached the optimizer.
        before = {k: v.clone() for k, v in run.trainer.unwrapped.state_dict().items() if torch.is_tensor(v)}
        dist_ckpt.load_model_weights(run.trainer.unwrapped, dist_ckpt.latest(run.ckpt_root))
        after = run.trainer.unwrapped.state_dict()
        result["checkpoint_equal"] = all(torch.equal(v, after[k]) for k, v in before.items())
        result["checkpoint_step"] = dist_ckpt.latest(run.ckpt_root).name
    finally:
        run.close()
    rows = read_metrics(Path(cfg.logging.run_dir) / "metrics.jsonl")
    result["steps"] = [[{"group": s.group_id, "index": s.sample_index, "response": s.response_ids,
                         "reward": s.reward, "version": s.policy_version} for s in b.samples] for b in batches]
    result["metrics"] = rows
    Path(out).write_text(json.dumps(result))


def _kill_when_generating(engine) -> None:
    """Kill engine 0 right after its next generate request is sent: mid-rollout whatever the load."""
    send, killed = engine._send, []

    def send_then_kill(e: int, msg: tuple) -> None:
        send(e, msg)
        if e == 0 and msg[0] == "generate" and not killed:
            killed.append(engine._procs[0].pid)
            engine._procs[0].process.kill()
            engine._procs[0].process.join(30)

    engine._send = send_then_kill


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
