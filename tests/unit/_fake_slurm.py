"""Stand-ins for Slurm on a machine without it: `srun`, `scontrol` (and, when asked, `torchrun`, `ip`,
`getent`) that record their argv and environment under $FAKE_LOG. The fake `srun` drops its --options
and runs the step locally; `scontrol show hostnames` prints $FAKE_HOSTS (comma-separated)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's python3, for the steps that really run

RECORDER = """#!/usr/bin/env bash
name=$(basename "$0")
printf '%s\\n' "$@" > "$FAKE_LOG/$name.argv"
env > "$FAKE_LOG/$name.env"
case "$name" in
  scontrol)
    if [[ "$1" == show ]]; then tr , '\\n' <<< "${FAKE_HOSTS:-node01,node02,node03,node04}"; fi
    exit 0 ;;
  srun)
    sleep "${FAKE_SRUN_SLEEP:-0}"
    while [[ "$1" == --* ]]; do shift; done
    exec "$@" ;;
  ip) echo "${FAKE_IP_ROUTE:-}" ;;
  getent) echo "${FAKE_GETENT:-}" ;;
esac
"""


def fake_slurm(tmp_path: Path, fakes: tuple[str, ...] = ("srun", "scontrol", "torchrun"), **env: str) -> dict:
    """Environment for running a launch script with `fakes` first on PATH, 4 nodes, one GRPO config."""
    fake_bin, log = tmp_path / "bin", tmp_path / "log"
    fake_bin.mkdir(parents=True)
    log.mkdir()
    for name in fakes:
        (fake_bin / name).write_text(RECORDER)
        (fake_bin / name).chmod(0o755)
    return {
        "PATH": f"{fake_bin}:{BIN}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_LOG": str(log),
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_JOB_NODELIST": "node[01-04]",
        "SLURM_CPUS_ON_NODE": "96",
        "CONFIG": "configs/dsv3_671b_grpo_256xh100.yaml",
        "SHARED": str(tmp_path / "shared"),
        "R1M_IMAGE": "/images/r1-megatron.sqsh",
        "TORCHRUN": "torchrun",
        "PREFLIGHT": "0",
        **env,
    }


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def env_of(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in lines(path) if "=" in line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
