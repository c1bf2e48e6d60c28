"""Asynchronous reward scoring in worker processes with a hard per-item timeout (docs/grpo.md#rewards).

    pool = RewardPool(cfg.reward)
    ticket = pool.submit([(response, ground_truth), ...])   # returns at once; workers start scoring
    ...                                                     # the caller keeps generating
    results = pool.wait(ticket)                             # list[RewardResult], in item order

Why processes, and why this way:
- math-verify and sympy can hang on pathological answers (`9^{9^{9^{9}}}`), and math-verify's signal
  timeout does not work off the main thread. Each item is scored in a worker process; a worker that
  passes the deadline is killed with SIGKILL (its process group and every descendant) and replaced, and
  its item scores 0 with error "timeout".
- A worker that dies on its own (os._exit, a segfault) is replaced and its item is scored once more in a
  fresh worker; a second death gives error "worker_crash". An exception inside a scorer never kills a
  worker: it becomes error "exception:<Type>".
- Every error is counted as `reward_error/<type>`; no sample is lost and none becomes a silent 0.
- Workers start with the "spawn" method by default: the trainer may hold threads (fork is unsafe), and
  spawned workers are our direct children, so nothing outlives `close()` (forkserver would leave its
  server process). A worker calls its scorer's `prepare()` (imports, warm-up) before taking work, so
  import time is never charged to an item's timeout; a replacement costs one interpreter start.
- One dispatcher thread owns the workers: it feeds idle workers, collects results and enforces deadlines.
  It also starts every worker, because the workers ask to die with the thread that started them
  (PR_SET_PDEATHSIG), so a crashed trainer leaves no scorers behind.

Hidden time: `busy_s` is the wall time during which any submitted item was unscored; `blocked_s` the part
of it the caller spent inside wait()/results(). `hidden_frac = 1 - blocked_s / busy_s` is the share of
reward time that overlapped the caller's own work.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import Any

import psutil

from r1_megatron.config.schema import RewardConfig
from r1_megatron.reward import WeightedScorer
from r1_megatron.reward.registry import RewardResult, names

Scorer = Callable[[str, Any], RewardResult]
_MAX_STARTUP_FAILURES = 3  # consecutive worker deaths before ready: the pool cannot work (e.g. import error)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: close() and the finalizer still kill the workers
        pass


def _worker_main(conn: Connection, scorer: Scorer) -> None:
    os.setpgid(0, 0)  # its own process group, so a kill takes whatever it started along
    _die_with_parent()
    if hasattr(scorer, "prepare"):
        scorer.prepare()  # imports and warm-up now, outside any item's deadline
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        item_id, response, truth = msg
        try:
            r = scorer(response, truth)
            out = ("done", item_id, float(r.score), {k: float(v) for k, v in r.components.items()}, r.error)
        except Exception as e:
            out = ("done", item_id, 0.0, {}, f"exception:{type(e).__name__}")
        conn.send(out)


def _signal_tree(proc: mp.process.BaseProcess) -> None:
    """SIGKILL a worker, its process group and every descendant (a sandbox may have left the group).
    Does not wait: reaping can lag under load, and an item's result must not wait for it."""
    pid = proc.pid
    if proc.exitcode is not None:  # already reaped: its pid may belong to someone else by now
        return
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    try:
        # Before the worker's setpgid it still shares our group: only kill a group it leads.
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for d in descendants:
        try:
            d.kill()
        except psutil.Error:
            pass


def _kill_tree(proc: mp.process.BaseProcess) -> None:
    _signal_tree(proc)
    proc.join(timeout=5)


def _kill_all(live: dict[int, mp.process.BaseProcess]) -> None:
    for proc in list(live.values()):
        if proc.is_alive():
            _kill_tree(proc)
    live.clear()


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: Connection
    ready: bool = False
    item: int | None = None  # id of the item in flight
    started: float = 0.0  # when that item was sent
    deadline: float = 0.0  # when it gets killed


@dataclass
class _Item:
    ticket: int
    index: int
    response: str
    truth: Any
    timeout: float
    crashes: int = 0


@dataclass
class _Group:
    results: list[RewardResult | None]
    remaining: int


class RewardPool:
    """Scores (response, ground_truth) items in `num_workers` processes; groups are submitted
    asynchronously and gathered in submission order. Use as a context manager, or call close()."""

    def __init__(
        self,
        cfg: RewardConfig | None = None,
        *,
        num_workers: int | None = None,
        timeout_s: float | None = None,
        scorer: Scorer | None = None,
        start_method: str = "spawn",
    ) -> None:
        cfg = cfg or RewardConfig()
        self.num_workers = num_workers if num_workers is not None else cfg.num_workers
        self.timeout_s = float(timeout_s if timeout_s is not None else cfg.timeout_s)
        if self.num_workers < 1:
            raise ValueError(f"reward.num_workers({self.num_workers}) must be >= 1")
        if not self.timeout_s > 0:
            raise ValueError(f"reward.timeout_s({self.timeout_s}) must be > 0")
        if scorer is None:
            scorer = self._default_scorer(cfg)
        try:
            pickle.dumps(scorer)
        except Exception as e:
            raise TypeError(f"RewardPool: the scorer must be picklable (module-level): {e}") from None
        self._scorer = scorer
        self._ctx = mp.get_context(start_method)
        self._cond = threading.Condition()
        self._queue: deque[int] = deque()
        self._items: dict[int, _Item] = {}
        self._groups: dict[int, _Group] = {}
        self._next_ticket = self._next_item = 0
        self._workers: list[_Worker] = []
        self._live: dict[int, mp.process.BaseProcess] = {}
        self._counters: Counter[str] = Counter()
        self._outstanding = 0
        self._busy_since = 0.0
        self._busy_s = self._blocked_s = self._max_item_s = 0.0
        self._startup_failures = 0
        self._to_spawn = 0  # replacements owed, started by the dispatcher once it drops the lock
        self._to_reap: list[mp.process.BaseProcess] = []  # killed workers, joined once it drops the lock
        self._failure: str | None = None
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._finalizer = weakref.finalize(self, _kill_all, self._live)
        self._thread = threading.Thread(target=self._run, name="reward-pool", daemon=True)
        self._thread.start()

    @staticmethod
    def _default_scorer(cfg: RewardConfig) -> Scorer:
        from r1_megatron.reward.language import SCRIPTS

        known = names()
        for name in cfg.weights:
            if name not in known:
                raise ValueError(f"reward.weights.{name}: no reward component '{name}'; registered: {known}")
        if "language" in cfg.weights and cfg.language not in SCRIPTS:
            raise ValueError(f"reward.language: unknown language {cfg.language!r}; known: {sorted(SCRIPTS)}")
        return WeightedScorer(dict(cfg.weights), cfg.language, cfg.sandbox, cfg.code_mode)

    # ---- caller side -------------------------------------------------------------------------------

    def submit(self, items: Sequence[tuple[str, Any]]) -> int:
        """Queue a group of (response, ground_truth) items; returns its ticket at once."""
        checked = []
        extra = getattr(self._scorer, "extra_seconds", None)
        for i, item in enumerate(items):
            if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"RewardPool.submit: item {i} must be (response: str, truth): {item!r:.40}")
            checked.append((item[0], item[1], self.timeout_s + (extra(item[1]) if extra else 0.0)))
        with self._cond:
            if self._closed:
                raise RuntimeError("RewardPool.submit: the pool is closed")
            if self._failure:
                raise RuntimeError(f"RewardPool.submit: {self._failure}")
            ticket = self._next_ticket
            self._next_ticket += 1
            self._groups[ticket] = _Group([None] * len(checked), len(checked))
            if checked and self._outstanding == 0:
                self._busy_since = time.monotonic()
            self._outstanding += len(checked)
            for index, (response, truth, timeout) in enumerate(checked):
                self._items[self._next_item] = _Item(ticket, index, response, truth, timeout)
                self._queue.append(self._next_item)
                self._next_item += 1
        self._wake()
        return ticket

    def wait(self, ticket: int) -> list[RewardResult]:
        """Block until group `ticket` is scored; its results in item order (each ticket is gathered once)."""
        with self._cond:
            if ticket not in self._groups:
                raise KeyError(f"RewardPool.wait: unknown or already gathered ticket {ticket}")
            group = self._groups[ticket]
            t0 = time.monotonic()
            while group.remaining:
                if self._closed or self._failure:
                    raise RuntimeError(
                        f"RewardPool.wait: {self._failure or 'the pool was closed'} with "
                        f"{group.remaining} items of group {ticket} unscored"
                    )
                self._cond.wait()
            self._blocked_s += time.monotonic() - t0
            del self._groups[ticket]
            return list(group.results)  # type: ignore[arg-type]

    def results(self) -> list[list[RewardResult]]:
        """Wait for every group not yet gathered; their results in submission order."""
        with self._cond:
            tickets = sorted(self._groups)
        return [self.wait(t) for t in tickets]

    def score(self, items: Sequence[tuple[str, Any]]) -> list[RewardResult]:
        """Synchronous convenience: submit one group and wait for it."""
        return self.wait(self.submit(items))

    def stats(self, reset: bool = False) -> dict[str, float]:
        """Counters (`reward_error/<type>`, `reward/items`, `reward/worker_restarts`, `reward/rescored`)
        and timing (`reward/busy_s`, `reward/blocked_s`, `reward/hidden_frac`, `reward/max_item_s`)."""
        with self._cond:
            now = time.monotonic()
            busy = self._busy_s + (now - self._busy_since if self._outstanding else 0.0)
            out = {k: float(v) for k, v in self._counters.items()}
            out.update({"reward/busy_s": busy, "reward/blocked_s": self._blocked_s})
            out["reward/max_item_s"] = self._max_item_s
            if busy > 0:
                out["reward/hidden_frac"] = min(1.0, max(0.0, 1.0 - self._blocked_s / busy))
            if reset:
                self._counters.clear()
                self._busy_s = self._blocked_s = self._max_item_s = 0.0
                self._busy_since = now
            return out

    def worker_pids(self) -> list[int]:
        with self._cond:
            return [w.proc.pid for w in self._workers if w.proc.pid is not None]

    def close(self) -> None:
        """Stop and reap every worker. Groups not yet gathered are abandoned (wait() raises)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._wake()
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):  # the pipe is full (already woken) or closed
            pass

    # ---- dispatcher thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            for _ in range(self.num_workers):
                self._spawn()
            while self._step():
                pass
        except BaseException as e:  # a dispatcher bug must surface in wait(), not hang it
            with self._cond:
                self._failure = f"reward dispatcher failed: {type(e).__name__}: {e}"
                self._cond.notify_all()
        finally:
            self._shutdown_workers()

    def _spawn(self) -> None:
        """Start one worker. Called without the lock held: a process start takes a while and the
        caller's wait() must not block on it."""
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker_main, args=(child, self._scorer), daemon=True)
        proc.start()
        child.close()
        with self._cond:
            self._live[proc.pid] = proc
            self._workers.append(_Worker(proc, parent))

    def _step(self) -> bool:
        """One round: feed idle workers, wait for an event or the nearest deadline, handle it."""
        with self._cond:
            if self._closed:
                return False
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.item is None and self._queue:
                    item_id = self._queue.popleft()
                    item = self._items[item_id]
                    try:
                        w.conn.send((item_id, item.response, item.truth))
                    except OSError:  # it just died: its sentinel fires next round, the item waits
                        self._queue.appendleft(item_id)
                        continue
                    w.item, w.started, w.deadline = item_id, now, now + item.timeout
            deadlines = [w.deadline for w in self._workers if w.item is not None]
            workers = list(self._workers)
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        watched = [self._wake_r, *(w.conn for w in workers), *(w.proc.sentinel for w in workers)]
        ready = set(wait_any(watched, timeout))
        if self._wake_r in ready:
            os.read(self._wake_r, 4096)
        with self._cond:
            for w in workers:
                dead = w.proc.sentinel in ready
                if w.conn in ready or dead:
                    dead = self._drain(w) or dead
                if dead:
                    self._on_death(w)
            now = time.monotonic()
            for w in list(self._workers):
                if w.item is not None and now >= w.deadline:
                    self._on_timeout(w)
            self._cond.notify_all()
            to_spawn, self._to_spawn = self._to_spawn, 0
            to_reap, self._to_reap = self._to_reap, []
        for proc in to_reap:
            proc.join(timeout=5)
        for _ in range(to_spawn):
            self._spawn()
        return True

    def _drain(self, w: _Worker) -> bool:
        """Read every message the worker has sent; True when its pipe is closed (it died)."""
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                    self._startup_failures = 0
                elif msg[0] == "done" and msg[1] == w.item:
                    _, item_id, score, components, error = msg
                    w.item = None
                    seconds = time.monotonic() - w.started
                    self._resolve(item_id, RewardResult(score, components, error), seconds)
        except (EOFError, OSError):
            return True
        return False

    def _retire(self, w: _Worker) -> None:
        _signal_tree(w.proc)
        self._to_reap.append(w.proc)
        w.conn.close()
        self._workers.remove(w)
        self._live.pop(w.proc.pid, None)
        self._counters["reward/worker_restarts"] += 1

    def _on_death(self, w: _Worker) -> None:
        was_ready, item_id = w.ready, w.item
        self._retire(w)
        if item_id is not None:
            item = self._items[item_id]
            item.crashes += 1
            if item.crashes >= 2:
                self._resolve(item_id, RewardResult(0.0, {}, "worker_crash"), time.monotonic() - w.started)
            else:
                self._queue.appendleft(item_id)  # first in line for the replacement
                self._counters["reward/rescored"] += 1
        if not was_ready:
            self._startup_failures += 1
            if self._startup_failures >= _MAX_STARTUP_FAILURES:
                self._fail(
                    f"reward workers died during startup {self._startup_failures} times in a row "
                    f"(last exit code {w.proc.exitcode})"
                )
                return
        self._to_spawn += 1

    def _on_timeout(self, w: _Worker) -> None:
        item_id, started = w.item, w.started
        self._retire(w)
        self._resolve(item_id, RewardResult(0.0, {}, "timeout"), time.monotonic() - started)
        self._to_spawn += 1

    def _fail(self, reason: str) -> None:
        """The pool cannot score: resolve every open item with error "pool_failure" and refuse new work."""
        self._failure = reason
        open_items = list(self._queue) + [w.item for w in self._workers if w.item is not None]
        self._queue.clear()
        for item_id in open_items:
            self._resolve(item_id, RewardResult(0.0, {}, "pool_failure"), 0.0)

    def _resolve(self, item_id: int, result: RewardResult, seconds: float) -> None:
        item = self._items.pop(item_id)
        group = self._groups.get(item.ticket)
        if group is not None:
            group.results[item.index] = result
            group.remaining -= 1
        self._counters["reward/items"] += 1
        for error in (result.error or "").split(","):
            if error:
                self._counters[f"reward_error/{error}"] += 1
        self._max_item_s = max(self._max_item_s, seconds)
        self._outstanding -= 1
        if self._outstanding == 0:
            self._busy_s += time.monotonic() - self._busy_since

    def _shutdown_workers(self) -> None:
        with self._cond:
            workers = list(self._workers)
            self._workers.clear()
            to_reap, self._to_reap = self._to_reap, []
        for proc in to_reap:
            proc.join(timeout=5)
        for w in workers:
            if w.ready and w.item is None:
                try:
                    w.conn.send(None)  # idle: let it exit on its own
                except OSError:
                    pass
            else:  # scoring or still importing: nothing of value to wait for
                _kill_tree(w.proc)
        deadline = time.monotonic() + 2.0
        for w in workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                _kill_tree(w.proc)
            w.conn.close()
            self._live.pop(w.proc.pid, None)
        with self._cond:
            self._cond.notify_all()
