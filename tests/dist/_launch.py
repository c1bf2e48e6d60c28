"""Start N ranks of a worker script like torchrun does (RANK/WORLD_SIZE/MASTER_* env), with a hard timeout.

Each rank runs in its own process group (so a kill reaches its children), with one intra-op thread
(the CI machine has 2 cores shared by up to 4 ranks). On timeout every rank is killed and the test
fails with the tail of each rank's log. Results travel through files the workers write.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RankResult:
    rank: int
    returncode: int
    log: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world_size: int, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
        PYTHONWARNINGS="ignore",
    )
    env.update(extra or {})
    return env


def launch(
    argv: list[str], nprocs: int, log_dir: Path, *, timeout: float, env: dict[str, str] | None = None
) -> list[RankResult]:
    """Run `python argv...` as `nprocs` ranks; wait for all (or kill all at `timeout` seconds)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for rank in range(nprocs):
        log = open(log_dir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv],
                env=worker_env(rank, nprocs, port, env),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + timeout
    timed_out = False
    for p in procs:
        left = deadline - time.monotonic()
        try:
            p.wait(timeout=max(left, 0.01))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        # Workers register faulthandler on SIGUSR1: their stacks land in the logs before the kill.
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGUSR1)
        time.sleep(2.0)
    for p in procs:
        # Each rank leads its own process group. End the whole group, also for a rank that already
        # exited: helpers it spawned (dist_checkpointing's save workers) outlive a SIGKILLed rank.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    for log in logs:
        log.close()
    results = [
        RankResult(r, p.returncode, (log_dir / f"rank{r}.log").read_text()) for r, p in enumerate(procs)
    ]
    if timed_out:
        raise TimeoutError(f"{argv} did not finish in {timeout:.0f}s:\n{tails(results)}")
    return results


def tails(results: list[RankResult], lines: int = 25) -> str:
    out = []
    for r in results:
        tail = "\n".join(r.log.strip().splitlines()[-lines:])
        out.append(f"--- rank {r.rank} (exit {r.returncode}) ---\n{tail}")
    return "\n".join(out)


def check_ok(results: list[RankResult]) -> None:
    """Fail with every rank's log tail unless all ranks exited 0."""
    if any(r.returncode != 0 for r in results):
        raise AssertionError(f"a rank failed:\n{tails(results)}")
