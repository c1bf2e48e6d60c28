"""A separate rollout engine process ends when the trainer that started it is gone
(rollout/separate_worker.py _exit_with_parent): a crashed trainer leaves no engine behind."""
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import os, time
from r1_megatron.rollout.separate_worker import _exit_with_parent
pid = os.fork()
if pid == 0:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1); os.dup2(null, 2)  # let the caller see EOF at once
    if {watch}:
        _exit_with_parent(poll_s=0.1)
    time.sleep(30)
    os._exit(0)
print(pid, flush=True)
os._exit(0)  # the 'trainer' dies without a word
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _orphan(watch: bool) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(watch=watch)], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    return int(out.stdout.split()[0])


def test_engine_process_ends_when_its_parent_dies():
    pid = _orphan(watch=True)
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def test_without_the_watch_the_orphan_lives_on():
    pid = _orphan(watch=False)  # the control: what the watch prevents
    try:
        time.sleep(1.0)
        assert _alive(pid)
    finally:
        os.kill(pid, 9)
