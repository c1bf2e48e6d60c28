"""RewardPool guarantees: results complete and in submission order; a hung worker is SIGKILLed (with its
descendants) and replaced, its item scored 0 with error "timeout"; a worker that dies is replaced and its
item re-scored once, a second death gives "worker_crash"; every error is counted as reward_error/<type>;
submit() returns at once and the hidden share of reward time is measured; nothing outlives close().
The math path is fuzzed through the pool: no item outlives its timeout by more than 1 s, no exception
escapes, every error is counted."""

import ctypes
import os
import subprocess
import time
from collections import Counter
from multiprocessing import resource_tracker
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from r1_megatron.config.schema import RewardConfig
from r1_megatron.reward.pool import RewardPool
from r1_megatron.reward.registry import RewardResult

TIMEOUT = 1.5


def faulty_scorer(response: str, truth):
    """A scorer with scripted failures; `truth` carries the expected score or a marker file path."""
    kind, _, arg = response.partition(":")
    if kind == "hang":
        time.sleep(600)
    elif kind == "hang_with_child":  # a descendant in its own session, as a sandbox would make
        child = subprocess.Popen(["sleep", "600"], start_new_session=True)
        Path(arg).write_text(str(child.pid))
        time.sleep(600)
    elif kind == "exit":
        os._exit(3)
    elif kind == "segv":
        ctypes.string_at(0)
    elif kind == "crash_once":
        if not Path(arg).exists():
            Path(arg).touch()
            os._exit(4)
    elif kind == "raise":
        raise KeyError(arg)
    elif kind == "sleep":
        time.sleep(float(arg))
    return RewardResult(float(truth), {"echo": float(truth)})


def _new_children(before: set[int]) -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]


def _children() -> set[int]:
    resource_tracker.ensure_running()  # multiprocessing's own singleton, not a worker of ours
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def pool():
    before = _children()
    with RewardPool(num_workers=2, timeout_s=TIMEOUT, scorer=faulty_scorer) as p:
        yield p
    assert _new_children(before) == []


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _ok(i: int) -> tuple[str, float]:
    return (f"ok:{i}", i / 100)


def test_results_in_order_and_complete(pool):
    pool.stats(reset=True)
    groups = [[_ok(g * 10 + i) for i in range(7)] for g in range(3)]
    tickets = [pool.submit(g) for g in groups]
    assert pool.wait(tickets[2]) == [RewardResult(t, {"echo": t}) for _, t in groups[2]]
    rest = pool.results()
    assert rest == [[RewardResult(t, {"echo": t}) for _, t in g] for g in groups[:2]]
    assert pool.results() == []
    stats = pool.stats()
    assert stats["reward/items"] == 21
    assert not any(k.startswith("reward_error/") for k in stats)
    with pytest.raises(KeyError, match="already gathered"):
        pool.wait(tickets[0])


def test_hung_worker_is_killed_and_replaced(pool, tmp_path):
    pool.stats(reset=True)
    before = set(pool.worker_pids())
    child_file = tmp_path / "child.pid"
    items = [_ok(1), ("hang:", 0.0), _ok(2), (f"hang_with_child:{child_file}", 0.0), _ok(3)]
    ticket = pool.submit(items)
    results = pool.wait(ticket)
    assert [r.error for r in results] == [None, "timeout", None, "timeout", None]
    assert [r.score for r in results] == [0.01, 0.0, 0.02, 0.0, 0.03]
    stats = pool.stats()
    assert stats["reward_error/timeout"] == 2 and stats["reward/worker_restarts"] == 2
    assert stats["reward/max_item_s"] <= TIMEOUT + 1.0
    # The descendant that left the worker's session died with it.
    child_pid = int(child_file.read_text())
    assert not _running(child_pid)
    # Two fresh workers replaced the killed ones, and the pool keeps scoring.
    assert pool.score([_ok(4)]) == [RewardResult(0.04, {"echo": 0.04})]
    after = set(pool.worker_pids())
    assert len(after) == 2 and len(before - after) == 2
    assert not any(_running(p) for p in before - after)


def test_crashed_worker_is_replaced_and_item_rescored(pool, tmp_path):
    pool.stats(reset=True)
    crash_once = f"crash_once:{tmp_path / 'm'}"
    items = [_ok(5), (crash_once, 0.5), ("exit:", 0.0), ("segv:", 0.0), ("raise:boom", 0.0)]
    results = pool.score(items)
    assert results[0] == RewardResult(0.05, {"echo": 0.05})
    assert results[1] == RewardResult(0.5, {"echo": 0.5})  # died once, the second worker scored it
    assert [r.error for r in results[2:]] == ["worker_crash", "worker_crash", "exception:KeyError"]
    assert [r.score for r in results[2:]] == [0.0, 0.0, 0.0]
    stats = pool.stats()
    assert stats["reward_error/worker_crash"] == 2
    assert stats["reward_error/exception:KeyError"] == 1
    assert stats["reward/rescored"] == 3  # crash_once, exit and segv each got their second try
    assert stats["reward/worker_restarts"] == 5  # 1 + 2 + 2 deaths; the exception killed nobody
    assert stats["reward/items"] == 5


def test_submit_is_asynchronous_and_hidden_time_is_measured(pool):
    pool.score([_ok(0)])  # both workers warm
    pool.stats(reset=True)
    items = [("sleep:0.3", 0.1)] * 4  # ~0.6 s of scoring on two workers
    t0 = time.monotonic()
    ticket = pool.submit(items)
    assert time.monotonic() - t0 < 0.5  # far less than the scoring itself
    time.sleep(2.0)  # the caller's own work (generation), longer than the scoring
    assert [r.score for r in pool.wait(ticket)] == [0.1] * 4
    hidden = pool.stats(reset=True)
    assert hidden["reward/hidden_frac"] > 0.9
    # Waiting right away hides nothing.
    pool.wait(pool.submit(items))
    exposed = pool.stats()
    assert exposed["reward/hidden_frac"] < 0.2 and exposed["reward/blocked_s"] >= 0.5


def test_bad_items_and_scorers_are_refused(pool):
    with pytest.raises(TypeError, match="item 1 must be"):
        pool.submit([_ok(1), ("only one",)])
    with pytest.raises(TypeError, match="picklable"):
        RewardPool(num_workers=1, scorer=lambda r, t: RewardResult(0.0))
    with pytest.raises(ValueError, match="reward.weights.acuracy"):
        RewardPool(RewardConfig(weights={"acuracy": 1.0}))
    with pytest.raises(ValueError, match="reward.language"):
        RewardPool(RewardConfig(weights={"language": 1.0}, language="xx"))


def test_close_during_a_hang_leaves_no_process():
    before = _children()  # includes the idle workers of the module's pools
    p = RewardPool(num_workers=2, timeout_s=60, scorer=faulty_scorer)
    ticket = p.submit([("hang:", 0.0), ("hang:", 0.0)])
    deadline = time.monotonic() + 30
    while len(_new_children(before)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 10
    assert _new_children(before) == []
    with pytest.raises(RuntimeError, match="closed with 2 items"):
        p.wait(ticket)
    with pytest.raises(RuntimeError, match="closed"):
        p.submit([_ok(1)])


# ---- the real math path, fuzzed through the pool -----------------------------------------------------

MATH_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def math_pool():
    before = _children()
    cfg = RewardConfig(weights={"accuracy": 1.0, "format": 0.1})
    with RewardPool(cfg, num_workers=2, timeout_s=MATH_TIMEOUT) as p:
        yield p
    assert _new_children(before) == []


def test_real_math_hang_times_out(math_pool):
    math_pool.stats(reset=True)
    results = math_pool.score([(r"\boxed{9^{9^{9^{9}}}}", "1"), (r"\boxed{\frac{1}{2}}", "0.5")])
    assert results[0] == RewardResult(0.0, {}, "timeout")
    assert results[1].score == 1.0 and results[1].error is None
    stats = math_pool.stats()
    assert stats["reward_error/timeout"] == 1 and stats["reward/max_item_s"] <= MATH_TIMEOUT + 1.0


_exponents = st.lists(st.integers(2, 99), min_size=2, max_size=5).flatmap(
    lambda xs: st.sampled_from(["^".join(map(str, xs)), "^{".join(map(str, xs)) + "}" * (len(xs) - 1)])
)
_nested = st.tuples(st.integers(1, 3000), st.sampled_from(["{", "(", r"\frac{1}{", r"\sqrt{"])).map(
    lambda t: t[1] * t[0] + "1" + ("}" if t[1] != "(" else ")") * t[0]
)
_answer = st.one_of(st.text(max_size=200), _exponents, _nested)
_templates = st.sampled_from(["\\boxed{%s}", "<answer>%s</answer>", "%s", "<think>x</think>\\fbox{%s}"])
_response = st.tuples(_templates, _answer).map(lambda t: t[0].replace("%s", t[1]))
_truths = ["1", "0.5", r"\frac{1}{2}", "x+1", "[1,2)", r"\{1,2\}"]
_truth = st.one_of(st.sampled_from(_truths), st.text(max_size=30))


@settings(
    max_examples=16, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(st.lists(st.tuples(_response, _truth), min_size=1, max_size=3))
@example([(r"\boxed{9^{9^{9^{9}}}}", "1"), ("\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}", "1")])
@example([("\x00\udcff\U0010ffff \\boxed{\\frac{", "\\"), ("", "")])
def test_fuzz_math_through_pool(math_pool, items):
    math_pool.stats(reset=True)
    results = math_pool.score(items)
    stats = math_pool.stats()
    assert len(results) == len(items) and all(isinstance(r, RewardResult) for r in results)
    assert stats["reward/max_item_s"] <= MATH_TIMEOUT + 1.0
    errors = Counter(f"reward_error/{e}" for r in results if r.error for e in r.error.split(","))
    assert {k: v for k, v in stats.items() if k.startswith("reward_error/")} == errors
    for r in results:
        assert 0.0 <= r.score <= 1.1
        if r.error == "timeout":
            assert r.score == 0.0


def test_mixed_math_and_code_batch_with_sandbox_deadline():
    """One weight table scores math and code samples; a program that outlives the sandbox's wall limit
    gets the sandbox's typed reason, not the pool's kill (the pool's deadline for a code sample covers
    the sandbox's own)."""
    cfg = RewardConfig(weights={"accuracy": 1.0, "code": 1.0, "format": 0.1}, timeout_s=1.0)
    cfg.sandbox.wall_seconds = 1.0
    tests = {"tests": [{"stdin": "2 3\n", "stdout": "5\n"}]}
    good = "<think>add</think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    slow = "<think>wait</think>\n```python\nimport time\ntime.sleep(30)\n```"
    math = r"<think>half</think> \boxed{\frac{1}{2}}"
    with RewardPool(cfg, num_workers=2) as p:
        results = p.score([(good, tests), (slow, tests), (math, "0.5")])
        stats = p.stats()
    assert results[0].score == pytest.approx(1.1) and results[0].error is None
    assert results[0].components["code"] == 1.0 and "accuracy" not in results[0].components
    assert results[1].error == "sandbox:timeout" and results[1].score == pytest.approx(0.1)
    assert results[2].score == pytest.approx(1.1) and "code" not in results[2].components
    assert stats["reward_error/sandbox:timeout"] == 1 and "reward_error/timeout" not in stats
