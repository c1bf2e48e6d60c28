"""vLLM is quiet by default (rollout/vllm_process.py vllm_log_level): its logger at WARNING, and the two
reload loggers whose per-refit warnings are expected here drop everything below ERROR, even after vLLM
reconfigures its loggers; the known start-up warnings (KNOWN_STARTUP) are dropped by their text and any
other warning of those loggers still shows; logging.verbose keeps INFO and every warning. That no other
warning reaches a demo's output is checked on the real command (tests/e2e/test_demo_smoke.py)."""
import importlib
import logging

import pytest

from r1_megatron.rollout.vllm_process import KNOWN_STARTUP, RELOAD_LOGGERS, vllm_log_level


def _emitted(verbose: bool, messages: dict[str, list[tuple[int, str]]]) -> list[str]:
    """What each logger passes on of its (level, message) pairs after vllm_log_level(verbose) and vLLM's own
    logging set-up (the dictConfig that resets every vllm.* logger's level)."""
    vllm_log_level(verbose)
    from vllm.logger import _configure_vllm_root_logger

    _configure_vllm_root_logger()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    for name, pairs in messages.items():
        logger = importlib.import_module(name).logger  # fails if vLLM moves the modules that log
        assert logger.name == name
        logger.addHandler(handler)
        try:
            for level, text in pairs:
                logger.log(level, "%s", text)
        finally:
            logger.removeHandler(handler)
    return seen


RELOAD = {n: [(logging.WARNING, f"{n} warns"), (logging.ERROR, f"{n} fails")] for n in RELOAD_LOGGERS}
STARTUP = {n: [(logging.WARNING, f"{t} (and the rest of the message)") for t in known]
           + [(logging.WARNING, f"{n}: something new")] for n, known in KNOWN_STARTUP.items()}


def test_quiet_by_default_and_verbose_on_request(monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    try:
        assert _emitted(False, RELOAD) == [f"{n} fails" for n in RELOAD_LOGGERS]
        assert logging.getLogger("vllm").level == logging.WARNING
        monkeypatch.delenv("VLLM_LOGGING_LEVEL")
        assert _emitted(True, RELOAD) == [m for n in RELOAD_LOGGERS for m in (f"{n} warns", f"{n} fails")]
    finally:
        vllm_log_level(False)


def test_known_startup_warnings_dropped_by_text(monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    try:
        assert _emitted(False, STARTUP) == [f"{n}: something new" for n in KNOWN_STARTUP]
        monkeypatch.delenv("VLLM_LOGGING_LEVEL")
        assert len(_emitted(True, STARTUP)) == sum(len(pairs) for pairs in STARTUP.values())
    finally:
        vllm_log_level(False)
