"""Run untrusted Python against test cases, contained (docs/grpo.md#rewards).

Isolation levels, strongest first. `isolation_level()` says which one is active, and it is logged once.
- "bwrap": bubblewrap with new user, pid, net, ipc, uts and cgroup namespaces, and no further user
  namespaces. The code sees /usr and the interpreter's prefix read-only, a fresh /proc, a minimal /dev,
  and size-capped tmpfs at /tmp (its working directory) and /dev/shm. Everything else is absent: the
  project, home directories, /etc (so /etc/shadow), /root, /work. Only loopback exists, and it is empty.
- "unshare": util-linux `unshare` with new user, pid, net, ipc, uts and mount namespaces. The filesystem
  is the host's: only file permissions, through the unprivileged uid below, keep secrets out.
- "rlimits-only": no namespaces. The network is reachable (a warning is logged, and
  `require_no_network` refuses to run), a process that leaves its process group and whose runner was
  killed can outlive the run, and the process budget is shared by all sandboxes of the same uid.

At every level the code runs in its own session under rlimits (CPU seconds, address space, processes,
file size, open files, no core files), with a minimal environment and a wall-clock kill of the whole
tree, and its stdout/stderr are read up to a byte cap and never buffered beyond it.

Running as root (the usual container case), the code runs as an unprivileged uid (`cfg.uid`, 65534).
Root ignores RLIMIT_NPROC, so without this a fork bomb is unbounded; root could also signal the
trainer and read /etc/shadow. The uid is dropped before the isolator starts, so bwrap and unshare build
an unprivileged user namespace, and the kernel counts RLIMIT_NPROC per user namespace: every sandbox
gets its own process budget, and a fork bomb in one does not starve the others.

Interpreter: the trainer's own base interpreter (not the venv: it lives in the project directory, and
`-S` drops site-packages anyway), run with `-I -S`, so the code gets the same Python version and the
standard library only. When the unprivileged uid cannot reach it (pyenv under /root), the system
`/usr/bin/python3`; `cfg.python` overrides both. The choice is logged with the level.

Tests run in one sandbox per program: sandbox_runner.py forks a child per test inside it (see there,
also for why the runner cannot be made to forge a result). Any limit violation stops the run.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from r1_megatron.config.schema import SandboxConfig
from r1_megatron.reward.sandbox_runner import descendants

log = logging.getLogger(__name__)

_RUNNER = Path(__file__).with_name("sandbox_runner.py")
_LEVELS = {"auto": ("bwrap", "unshare", "rlimits-only"), "bwrap": ("bwrap",), "unshare": ("unshare",)}
_LEVELS["none"] = ("rlimits-only",)
_STDERR_KEEP = 65536  # the runner's own stderr (isolator errors), kept for the log
_STARTUP_S = 10.0  # allowance for the isolator and the interpreter to start on a loaded machine


class SandboxError(RuntimeError):
    """The sandbox cannot run as configured: no interpreter reachable, or no isolator where one is required."""


@dataclass
class TestRun:
    """What one test did. exit: exit code, or -signal when a signal killed it (as in subprocess)."""

    stdout: bytes
    stderr: bytes
    exit: int
    timed_out: bool
    output_limited: bool
    cpu_s: float
    wall_s: float
    processes: int  # processes of the test still alive when it ended or was killed
    completed: bool  # exit 0 within the limits, and for an assert test the asserts ran to the end
    probes: list[str] = field(default_factory=list)  # an assert test's probe lines (JSON), in order
    untrusted: bool = False  # an assert judged in the sandbox met a value that is not plain data


@dataclass
class SandboxRun:
    """One program's run over its tests. tests stops short after the first violation."""

    tests: list[TestRun]
    violation: str | None  # typed reason, e.g. "sandbox:timeout"; None when no limit was hit
    isolation: str
    wall_s: float


@dataclass(frozen=True)
class _Setup:
    level: str  # "bwrap" | "unshare" | "rlimits-only"
    python: str  # interpreter that runs the code
    prefixes: tuple[str, ...]  # its sys.base_prefix / base_exec_prefix (bound read-only under bwrap)
    uid: int | None  # unprivileged uid to run as (we are root), or None


_SETUPS: dict[tuple, _Setup] = {}
_LOCK = threading.Lock()


def isolation_level(cfg: SandboxConfig | None = None) -> str:
    """The isolation in force for `cfg`: "bwrap", "unshare" or "rlimits-only" (probed once, then cached)."""
    return _setup(cfg or SandboxConfig()).level


def run_tests(program: str, tests: list[dict], cfg: SandboxConfig | None = None) -> SandboxRun:
    """Run `program` once per test. A test is {"stdin": str} (stdin fed to the program) and/or
    {"assert": str} (python run after the program in the same namespace) or {"steps": [...]} (an assert
    test split by reward/assert_values.py; its probe values come back in TestRun.probes). Outputs are
    not judged here."""
    cfg = cfg or SandboxConfig()
    return _run(_setup(cfg), cfg, program, tests)


def _setup(cfg: SandboxConfig) -> _Setup:
    key = (cfg.isolation, cfg.python, cfg.uid, cfg.require_no_network)
    with _LOCK:
        if key not in _SETUPS:
            _SETUPS[key] = _detect(cfg)
        return _SETUPS[key]


def _detect(cfg: SandboxConfig) -> _Setup:
    uid = cfg.uid if os.geteuid() == 0 else None
    python, prefixes = _pick_python(cfg, uid)
    failures = []
    for level in _LEVELS[cfg.isolation]:
        setup = _Setup(level, python, prefixes, uid)
        try:
            run = _run(setup, cfg, "print(6 * 7)", [{"stdin": ""}])
        except OSError as e:  # the isolator is not installed
            failures.append(f"{level}: {e}")
            continue
        if run.tests and run.tests[0].completed and run.tests[0].stdout == b"42\n":
            break
        failures.append(f"{level}: {run.violation or 'wrong output'}")
    else:
        raise SandboxError(f"reward.sandbox.isolation={cfg.isolation}: nothing works ({'; '.join(failures)})")
    if level == "rlimits-only" and cfg.require_no_network:
        raise SandboxError(
            "reward.sandbox.require_no_network=true, but no network namespace can be made here "
            f"({'; '.join(failures) or 'isolation=none'}); install bubblewrap or allow user namespaces"
        )
    who = f"uid {uid}" if uid is not None else f"uid {os.geteuid()} (not root: no uid change)"
    msg = f"sandbox isolation: {level}; python {python}; runs as {who}"
    if level == "bwrap":
        log.info(msg)
    else:
        log.warning(
            "%s; WEAKER than bwrap: %s (%s)",
            msg,
            "project files readable if world-readable"
            if level == "unshare"
            else "network reachable, no pid namespace",
            "; ".join(failures) or f"isolation={cfg.isolation}",
        )
    return setup


def _pick_python(cfg: SandboxConfig, uid: int | None) -> tuple[str, tuple[str, ...]]:
    """The first interpreter the sandbox uid can run, with its prefixes."""
    if cfg.python:
        candidates = [cfg.python]
    else:
        base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        candidates = list(dict.fromkeys([base, "/usr/bin/python3"]))
    probe = "import ctypes, json, resource, selectors, sys; print(json.dumps([sys.base_prefix, sys.base_exec_prefix]))"
    reasons = []
    for exe in candidates:
        try:
            out = subprocess.run(
                [exe, "-I", "-S", "-c", probe],
                capture_output=True,
                check=False,
                timeout=30,
                cwd="/",
                env=_environment("/tmp"),
                **_user_kwargs(uid),
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            reasons.append(f"{exe}: {e}")
            continue
        if out.returncode == 0:
            if exe != candidates[0]:
                log.info("sandbox python: %s (%s)", exe, "; ".join(reasons))
            return os.path.realpath(exe), tuple(dict.fromkeys(json.loads(out.stdout)))
        reasons.append(f"{exe}: exit {out.returncode}: {out.stderr.decode(errors='replace').strip()[-200:]}")
    raise SandboxError(f"reward.sandbox.python: no interpreter runs as uid {uid}: {'; '.join(reasons)}")


def _user_kwargs(uid: int | None) -> dict:
    return {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}


def _environment(home: str) -> dict[str, str]:
    """The whole environment the code sees: nothing inherited from the trainer (no tokens, no paths)."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}


def _bwrap_args(setup: _Setup, cfg: SandboxConfig) -> list[str]:
    args = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"]
    # The runner is the pid namespace's init, so bwrap reaps it itself. With bwrap's own init, bwrap exits
    # on that init's report without reaping it, and every run leaves a zombie for the host's pid 1.
    args += ["--as-pid-1", "--new-session", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/", name)
        if path.is_symlink():  # merged /usr: /lib -> usr/lib
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    for prefix in setup.prefixes:
        if prefix != "/usr" and not prefix.startswith("/usr/"):
            args += ["--ro-bind", prefix, prefix]
    tmpfs = str(cfg.tmpfs_mb << 20)
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--proc", "/proc", "--dev", "/dev"]
    args += ["--size", tmpfs, "--tmpfs", "/dev/shm", "--size", tmpfs, "--tmpfs", "/tmp"]
    # bwrap's root and /dev are tmpfs without a size cap, writable by the sandbox user: freeze them.
    args += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp", "--"]
    return args


@functools.cache
def _runner_source() -> bytes:
    return _RUNNER.read_bytes()


# The interpreter reads the runner's source from stdin (length line, source), then the runner reads the
# payload: the command line stays short and readable in `ps`.
_BOOT = (
    "import sys; s = sys.stdin.buffer; "
    "exec(compile(s.read(int(s.readline())), 'sandbox_runner.py', 'exec'), {'__name__': '__main__'})"
)


def _command(setup: _Setup, cfg: SandboxConfig) -> list[str]:
    runner = [setup.python, "-I", "-S", "-c", _BOOT]
    if setup.level == "bwrap":
        return _bwrap_args(setup, cfg) + runner
    if setup.level == "unshare":
        # No uid map: the code has no capabilities even inside its namespaces (a mapped root would).
        ns = ["--user", "--net", "--pid", "--ipc", "--uts", "--mount", "--mount-proc"]
        return ["unshare", *ns, "--fork", "--kill-child", "--", *runner]
    return runner


def _run(setup: _Setup, cfg: SandboxConfig, program: str, tests: list[dict]) -> SandboxRun:
    start = time.monotonic()
    marker = secrets.token_hex(16)
    limits = {
        k: getattr(cfg, k)
        for k in ("wall_seconds", "cpu_seconds", "memory_mb", "max_processes", "file_size_mb", "open_files")
    }
    limits["max_output_bytes"] = cfg.max_output_bytes
    cases = [{"stdin": t.get("stdin", ""), "steps": _steps(t)} for t in tests]
    source = _runner_source()
    payload = json.dumps({"program": program, "tests": cases, "marker": marker, "limits": limits}).encode()
    payload = b"%d\n%s%s" % (len(source), source, payload)
    # Per test the runner may spend its wall limit plus up to 2 s killing leftovers, then the frame.
    deadline = start + _STARTUP_S + len(tests) * (cfg.wall_seconds + 3.0)
    cap = len(tests) * (cfg.max_output_bytes + 4096) + 4096
    workdir = None if setup.level == "bwrap" else _make_workdir(setup.uid)
    try:
        proc = subprocess.Popen(
            _command(setup, cfg),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir or "/",
            env=_environment(workdir or "/tmp"),
            start_new_session=True,
            **_user_kwargs(setup.uid),
        )
        try:
            report, errors, cut = _communicate(proc, payload, deadline, cap)
        finally:
            _stop(proc, setup.level)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, onerror=_force_remove)
    runs = _parse(report, [c["steps"] is not None for c in cases], marker)
    violation = cut or next((v for v in (_violation(r, cfg.max_processes) for r in runs) if v), None)
    if violation is None and len(runs) < len(tests):
        # The runner died before reporting every test. A signal means the code killed it; anything
        # else is the sandbox failing to start, which must not pass as the program's fault.
        rc = proc.returncode
        violation = "sandbox:killed" if rc < 0 or rc >= 128 else "sandbox:error"
        if violation == "sandbox:error":
            tail = errors.decode(errors="replace").strip()[-2000:]
            log.warning("sandbox (%s) failed, exit %s: %s", setup.level, rc, tail)
    return SandboxRun(runs, violation, setup.level, time.monotonic() - start)


def _steps(test: dict) -> list | None:
    if "steps" in test:
        return test["steps"]
    return [["exec", test["assert"]]] if test.get("assert") is not None else None


def _make_workdir(uid: int | None) -> str:
    path = tempfile.mkdtemp(prefix="r1m-sandbox-")
    if uid is not None:
        os.chown(path, uid, uid)
    return path


def _force_remove(func, path, exc_info) -> None:
    """rmtree fallback for directories the code made read-only."""
    os.chmod(os.path.dirname(path), 0o700)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, 0o700)
        shutil.rmtree(path, onerror=_force_remove)
    else:
        os.unlink(path)


def _communicate(
    proc: subprocess.Popen, payload: bytes, deadline: float, cap: int
) -> tuple[bytes, bytes, str | None]:
    """Feed the payload, collect the report (at most `cap` bytes) and the runner's stderr until EOF or
    the deadline. Returns (report, stderr, "sandbox:timeout" | "sandbox:output_limit" | None)."""
    sel = selectors.DefaultSelector()
    fds = {proc.stdin.fileno(): "in", proc.stdout.fileno(): "out", proc.stderr.fileno(): "err"}
    for fd, name in fds.items():
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_WRITE if name == "in" else selectors.EVENT_READ)
    bufs = {"out": bytearray(), "err": bytearray()}
    try:
        while any(name != "in" for name in (fds[k.fd] for k in sel.get_map().values())):
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(bufs["out"]), bytes(bufs["err"]), "sandbox:timeout"
            for key, _ in sel.select(left):
                name = fds[key.fd]
                if name == "in":
                    try:
                        payload = payload[os.write(key.fd, payload[:65536]) :]
                    except BrokenPipeError:
                        payload = b""
                    if not payload:
                        sel.unregister(key.fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                elif name == "out":
                    bufs["out"] += chunk
                    if len(bufs["out"]) > cap:
                        return bytes(bufs["out"][:cap]), bytes(bufs["err"]), "sandbox:output_limit"
                elif len(bufs["err"]) < _STDERR_KEEP:
                    bufs["err"] += chunk[: _STDERR_KEEP - len(bufs["err"])]
        return bytes(bufs["out"]), bytes(bufs["err"]), None
    finally:
        sel.close()


def _stop(proc: subprocess.Popen, level: str) -> None:
    """Make sure nothing of the run is left when this returns.

    Under bwrap/unshare, killing the namespace's init (the isolator's child) kills everything in the pid
    namespace, and the isolator exits once it has reaped it. Without a pid namespace, kill the runner's
    tree and its process group."""
    if proc.poll() is None:
        victims = descendants(proc.pid)
        if level == "rlimits-only":
            victims.append(proc.pid)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("sandbox: isolator %d did not exit after its namespace was killed", proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _parse(report: bytes, is_assert: list[bool], marker: str) -> list[TestRun]:
    """Frames: a JSON header line, then stdout_len + stderr_len raw bytes. A torn last frame is dropped."""
    runs: list[TestRun] = []
    proof = f"\n{marker}\n".encode()
    probe = re.compile(b"\n" + marker.encode() + b"=([^\n]*)\n")
    not_plain = f"\n{marker}!\n".encode()
    pos = 0
    while pos < len(report) and len(runs) < len(is_assert):
        end = report.find(b"\n", pos)
        if end < 0:
            break
        head = json.loads(report[pos:end])
        out_end = end + 1 + head["stdout_len"]
        err_end = out_end + head["stderr_len"]
        if err_end > len(report):
            break
        stdout, stderr = report[end + 1 : out_end], report[out_end:err_end]
        ok = head["exit"] == 0 and not head["timed_out"] and not head["output_limited"]
        probes: list[str] = []
        untrusted = False
        if is_assert[len(runs)]:
            untrusted = not_plain in stdout
            ok = ok and stdout.endswith(proof)
            stdout = stdout[: -len(proof)] if ok else stdout
            probes = [m.decode(errors="replace") for m in re.findall(probe, stdout)]
            stdout = re.sub(probe, b"", stdout)
        runs.append(
            TestRun(
                stdout=stdout,
                stderr=stderr,
                exit=head["exit"],
                timed_out=head["timed_out"],
                output_limited=head["output_limited"],
                cpu_s=head["cpu_s"],
                wall_s=head["wall_s"],
                processes=head["processes"],
                completed=ok,
                probes=probes,
                untrusted=untrusted,
            )
        )
        pos = err_end
    return runs


# What a limit looks like from inside Python, in the last lines of stderr.
_SIGNATURES = (
    (b"File too large", "sandbox:file_size"),  # EFBIG, when the code ignores SIGXFSZ
    (b"MemoryError", "sandbox:memory"),  # RLIMIT_AS
    (b"Resource temporarily unavailable", "sandbox:nproc"),  # EAGAIN from fork/clone (RLIMIT_NPROC)
    (b"can't start new thread", "sandbox:nproc"),
    (b"Too many open files", "sandbox:open_files"),  # RLIMIT_NOFILE
)


def _violation(run: TestRun, max_processes: int) -> str | None:
    """The limit a test hit, or None (a plain failure, such as a wrong answer or an exception, is not one)."""
    if run.completed:
        return None
    tail = run.stderr[-4096:]
    for needle, reason in _SIGNATURES:
        if needle in tail:
            return reason
    if run.exit == -signal.SIGXFSZ:
        return "sandbox:file_size"
    if run.exit == -signal.SIGXCPU:
        return "sandbox:cpu_time"
    if run.output_limited:
        return "sandbox:output_limit"
    if run.timed_out:
        # The runner takes a slot of the budget (so may bwrap's init), and the test had all the rest.
        return "sandbox:nproc" if run.processes >= max_processes - 2 else "sandbox:timeout"
    if run.exit == -signal.SIGKILL:
        return "sandbox:killed"  # the hard CPU limit, or the kernel's OOM killer
    return None
