"""The test runner that executes inside the sandbox. Standard library only: sandbox.py starts an
isolated `python -I -S` as the unprivileged uid and sends it this file's source on stdin.

After its source, it reads one JSON payload on stdin:
{"program", "tests": [{"stdin", "steps"}], "marker", "limits"}. For each test it forks a child that
applies the rlimits and runs the program; then, for an assert test, its steps (["exec", source]: python
run in the program's namespace; ["probe", [expression, ...]]: one line "<marker>=<JSON list>" with the
expressions' values, `encode`d as plain data only, judged outside by reward/assert_values.py), and a
line with the marker. The runner feeds the child the test's stdin, reads its stdout and stderr up to
the byte cap, and kills it at the wall-clock deadline. Per test it writes one frame to its own stdout,
which is the report channel: a JSON header line, then the raw stdout and stderr bytes.
It stops after the first test that was killed, since any limit violation zeroes the reward.

The asserts an exec step still judges in here were rewritten by assert_values.py `judged`: each value
they judge passes through VOUCH, and the builtins they use are named BUILTIN + name. Both are string
constants, replaced in the compiled code objects (`_bind`) by the check and by the real builtins taken
before the candidate's code runs, so no rebinding of a name, in the program's namespace or in
`builtins`, before or during the asserts, reaches them. The check (`_voucher`) lets plain data pass
(what `encode` accepts; a built-in iterator's items are checked as they are drawn); anything else
writes the line "<marker>!" straight to fd 1, which makes the test untrusted, and ends the test.

Why a fork per test rather than a fresh sandbox per test: the namespaces and the interpreter start once
per program, and forking the warm runner is cheap. Measured with bubblewrap on a loaded 2-core machine,
10 stdin tests took 78 ms in one sandbox against 595 ms in ten.

Trust: the runner makes itself non-dumpable, so test code running as the same uid can neither ptrace it
nor open its file descriptors through /proc. A test can kill the runner (sandbox.py then reports
"sandbox:killed"), but it cannot write to the report channel. The expected outputs never enter the
sandbox: sandbox.py and code.py compare outside.

Every process a test leaves behind is killed before the next test starts: the runner is a child subreaper
(and, in a pid namespace, its init), so orphans re-parent to it and stay in its process tree. As the
namespace's init it also ignores signals sent from inside: a test cannot kill it there.
"""

import builtins
import collections
import ctypes
import io
import json
import os
import resource
import selectors
import signal
import sys
import time
import traceback
import types
import warnings

# Taken when the runner starts, before any candidate code: what a judged assert's builtins resolve to,
# and the runner's own builtins (so a program that rebinds builtins.type or builtins.len changes
# nothing `encode` or the check sees). The same goes for the one os function the check calls.
__builtins__ = _REAL_BUILTINS = dict(vars(builtins))
_WRITE = os.write
VOUCH = "\x00r1m:vouch"  # in a judged assert, the call that checks a value is plain data
BUILTIN = "\x00r1m:builtin:"  # in a judged assert, BUILTIN + name stands for that real builtin

_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
_CHUNK = 65536


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value})")


def _set_limits(lim: dict) -> None:
    cpu = lim["cpu_seconds"]
    # The soft limit sends SIGXCPU; the hard one, a second later, SIGKILL for code that ignores it.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (lim["memory_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["max_processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["file_size_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


# Built-in one-shot iterators (a generator's values come from the program, and are checked one by one).
_ITERATORS = (
    types.GeneratorType, map, filter, zip, enumerate, reversed,
    type(iter([])), type(iter(())), type(iter(range(0))),
)


# The standard library's containers an honest answer returns, taken before the candidate runs (it cannot
# rebind them here), each with the tag it leaves under. They are read by dict's and deque's own C
# iteration and rebuilt as the same kind outside (a defaultdict as a dict: its factory stays behind), so
# they compare as they did in Python (Counter({'a': 1}) == {'a': 1}, deque([1]) != [1]).
_DICT_KINDS = {dict: "dict", collections.defaultdict: "dict", collections.OrderedDict: "OrderedDict",
               collections.Counter: "Counter"}
_DEQUE = collections.deque


def encode(value: object, depth: int = 0) -> object:
    """A JSON-able copy of plain data: int, float, complex, str, bytes, bool, None, and list, tuple,
    dict, set, frozenset, and the stdlib's OrderedDict, Counter, defaultdict (as a dict) and deque of those,
    containers tagged ({"list": [...]}, {"dict": [[k, v], ...]}); also a range, and a built-in iterator
    as the list of its items ({"iter": [...]}). Exact types only, found by type() and walked by the
    built-in containers' own iteration: nothing of a result object (its __eq__, __hash__, __repr__,
    __iter__) runs. Anything else raises TypeError naming the type."""
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is float or kind is str:
        return value
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    if kind is range:
        return {"range": [value.start, value.stop, value.step]}
    if kind is bytes:
        return {"bytes": list(value)}
    if depth < 100:
        if kind is list or kind is tuple or kind is set or kind is frozenset:
            return {kind.__name__: [encode(v, depth + 1) for v in value]}
        if kind is _DEQUE:
            return {"deque": [encode(v, depth + 1) for v in list(value)]}
        if kind in _DICT_KINDS:
            return {_DICT_KINDS[kind]: [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]}
        if kind in _ITERATORS:
            return {"iter": [encode(v, depth + 1) for v in value]}
    raise TypeError(kind.__qualname__ if depth < 100 else "nested deeper than 100")


def _probe(expressions: list, scope: dict, marker: str) -> None:
    values = []
    for source in expressions:
        value = eval(compile(source, "tests.py", "eval"), scope)  # noqa: S307 - the candidate's call
        try:
            values.append(encode(value))
        except TypeError as e:
            values.append({"untrusted": str(e)})
    sys.stdout.write("\n" + marker + "=" + json.dumps(values) + "\n")


class _NotPlain(BaseException):
    """A judged value that is not plain data: ends the test (a test's `except Exception` cannot keep it)."""


def _voucher(marker: str):
    """The check that VOUCH stands for: plain data passes unchanged (a built-in iterator as a generator
    that checks each item as it is drawn, so nothing is read ahead); anything else is reported on fd 1
    (not through sys.stdout, which the program can replace) and ends the test."""
    line = ("\n" + marker + "!\n").encode()

    def items(iterator):
        for value in iterator:
            yield vouch(value)

    def vouch(value):
        if type(value) in _ITERATORS:
            return items(value)
        try:
            encode(value)  # an iterator inside a container is read to its end here, as a probe reads it
        except TypeError as e:
            _WRITE(1, line)
            raise _NotPlain(f"a judged value is not plain data: {e}") from None
        return value

    return vouch


def _bind(code: types.CodeType, vouch) -> types.CodeType:
    """`code` with the VOUCH and BUILTIN + name constants replaced, in nested code objects too."""
    consts = []
    for c in code.co_consts:
        if type(c) is types.CodeType:
            c = _bind(c, vouch)
        elif type(c) is str and c == VOUCH:
            c = vouch
        elif type(c) is str and c.startswith(BUILTIN):
            c = _REAL_BUILTINS[c[len(BUILTIN) :]]
        consts.append(c)
    return code.replace(co_consts=tuple(consts))


def _compile_steps(steps: list, vouch) -> list:
    """The exec steps compiled and bound before the candidate's code runs (compiling the call of a
    string constant warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        return [(kind, _bind(compile(arg, "tests.py", "exec"), vouch) if kind == "exec" else arg)
                for kind, arg in steps]


def _child(program: str, steps: list | None, marker: str, lim: dict, fds: tuple[int, int, int]) -> None:
    """Runs in the forked child: becomes the test's process and never returns."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    _set_limits(lim)
    # Fresh text streams on fds 0-2: the runner's own sys.stdin has read ahead the payload.
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r")), encoding="utf-8")
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(1, "w")), encoding="utf-8", errors="backslashreplace"
    )
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.BufferedWriter(io.FileIO(2, "w")), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
    sys.argv = ["main.py"]
    code = 0
    try:
        compiled = None if steps is None else _compile_steps(steps, _voucher(marker))
        scope = {"__name__": "__main__", "__builtins__": builtins, "__file__": "main.py"}
        exec(compile(program, "main.py", "exec"), scope)  # noqa: S102 - running it is the point
        if compiled is not None:
            for kind, arg in compiled:
                if kind == "exec":
                    exec(arg, scope)  # noqa: S102
                else:
                    _probe(arg, scope, marker)
            # Proof that the asserts ran to the end: a program that exits early never prints it.
            sys.stdout.write("\n" + marker + "\n")
    except SystemExit as e:
        code = _exit_code(e.code)
    except BaseException:  # noqa: BLE001 - any failure of the program is reported, like python would
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - a stream the program closed or broke
        code = code or 1
    os._exit(code)


def descendants(root: int) -> list[int]:
    """Every live process below `root`, from the parent pids in /proc/*/stat."""
    parent: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the ")" that closes the command name: state, ppid, ...
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] != b"Z":
            parent.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        kids = parent.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill_tree(deadline: float) -> None:
    """SIGKILL everything below the runner until nothing is alive (a fork bomb keeps forking meanwhile).
    Reaping is left to the caller: the test's own exit status must be collected first."""
    me = os.getpid()
    while time.monotonic() < deadline:
        pids = descendants(me)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.002)


class _Output:
    """A test's stdout and stderr pipes, read without blocking and capped together at `cap` bytes."""

    def __init__(self, fds: tuple[int, int], cap: int):
        self.bufs = {fd: bytearray() for fd in fds}
        self.open = set(fds)
        self.cap = cap
        self.limited = False

    def read(self, fd: int) -> bool:
        """Read one chunk; False when nothing is available now or the pipe is at EOF."""
        try:
            chunk = os.read(fd, _CHUNK)
        except BlockingIOError:
            return False
        if not chunk:
            self.open.discard(fd)
            return False
        room = self.cap - sum(len(b) for b in self.bufs.values())
        self.bufs[fd] += chunk[: max(room, 0)]
        self.limited = len(chunk) > room
        return not self.limited


def _run_test(program: str, test: dict, marker: str, lim: dict) -> tuple[dict, bytes, bytes]:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            _child(program, test.get("steps"), marker, lim, (in_r, out_w, err_w))
        finally:
            os._exit(70)
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    data = test.get("stdin", "").encode()
    out = _Output((out_r, err_r), lim["max_output_bytes"])
    sel = selectors.DefaultSelector()
    for fd in (in_w, out_r, err_r):
        os.set_blocking(fd, False)
    sel.register(out_r, selectors.EVENT_READ)
    sel.register(err_r, selectors.EVENT_READ)
    sel.register(pidfd, selectors.EVENT_READ)
    sel.register(in_w, selectors.EVENT_WRITE)
    deadline = start + lim["wall_seconds"]
    timed_out = exited = False
    while not (exited or timed_out or out.limited):
        left = deadline - time.monotonic()
        timed_out = left <= 0
        for key, _ in [] if timed_out else sel.select(left):
            if key.fd == pidfd:
                exited = True
            elif key.fd == in_w:
                try:
                    data = data[os.write(in_w, data[:_CHUNK]) :]
                except BrokenPipeError:
                    data = b""
                if not data:
                    # EOF on the test's stdin.
                    sel.unregister(in_w)
                    os.close(in_w)
                    in_w = -1
            else:
                out.read(key.fd)
                if key.fd not in out.open:
                    sel.unregister(key.fd)
    if exited:
        # Take what the test process wrote before it exited; anything it left running is cut off below.
        for fd in list(out.open):
            while out.read(fd):
                pass
    # Live processes of this test now: at the process limit when a fork bomb ran into the wall clock.
    processes = len(descendants(os.getpid()))
    if not exited:
        _kill_tree(time.monotonic() + 2.0)
    _, status, usage = os.wait4(pid, 0)
    _kill_tree(time.monotonic() + 2.0)
    # Orphans re-parented to the runner: their zombies would count against the next test's RLIMIT_NPROC.
    _reap_all()
    sel.close()
    for fd in (in_w, out_r, err_r, pidfd):
        if fd >= 0:
            os.close(fd)
    header = {
        "exit": os.waitstatus_to_exitcode(status),
        "timed_out": timed_out,
        "output_limited": out.limited,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "wall_s": time.monotonic() - start,
        "processes": processes,
        "stdout_len": len(out.bufs[out_r]),
        "stderr_len": len(out.bufs[err_r]),
    }
    return header, bytes(out.bufs[out_r]), bytes(out.bufs[err_r])


def main() -> None:
    # Under memory pressure the kernel's OOM killer should pick test code first. Set before the runner
    # turns non-dumpable: that makes its /proc files root-owned, this one included.
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    _prctl(_PR_SET_DUMPABLE, 0)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    payload = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    report = sys.stdout.buffer
    program, marker, lim = payload["program"], payload["marker"], payload["limits"]
    for test in payload["tests"]:
        header, out, err = _run_test(program, test, marker, lim)
        report.write(json.dumps(header).encode() + b"\n" + out + err)
        report.flush()
        if header["timed_out"] or header["output_limited"] or header["exit"] < 0:
            break


if __name__ == "__main__":
    main()
