"""The multi-rank launcher the dist tests share leaves no processes behind: a rank that dies by
SIGKILL (as the crash-mid-save scenario's ranks do) takes the helpers it spawned with it."""

import textwrap
import time

from tests.dist._launch import launch

SPAWN_THEN_DIE = textwrap.dedent("""
    import os, signal, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(child.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_rank_leaves_no_helpers(tmp_path):
    script = tmp_path / "spawn_then_die.py"
    script.write_text(SPAWN_THEN_DIE)
    results = launch([str(script)], 2, tmp_path / "logs", timeout=60)
    assert [r.returncode for r in results] == [-9, -9]
    helpers = [int(r.log.split()[0]) for r in results]
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in helpers if _running(pid)] == []
