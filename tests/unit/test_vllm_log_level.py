"""vLLM is quiet by default (rollout/vllm_process.py vllm_log_level): its logger at WARNING, and the two
reload loggers whose per-refit warnings are expected here drop everything below ERROR, even after vLLM
reconfigures its loggers; the known start-up warnings (KNOWN_STARTUP) are dropped by their text and any
other warning of those loggers still shows; logging.verbose keeps INFO and every warning. That no other
warning reaches a demo's output is checked on the real command (tests/e2e/test_demo_smoke.py)."""
import importlib
import logging

import pytest

from r1_megatron.rollout.vllm_process import KNOWN_STARTUP, RELOAD_LOGGERS, vllm_log_level


def _emitted(verbose: bool) -> list[str]:
    """What the reload loggers pass on after vllm_log_level(verbose) and vLLM's own logging set-up."""
    vllm_log_level(verbose)
    from vllm.logger import _configure_vllm_root_logger

    _configure_vllm_root_logger()  # the dictConfig that resets every vllm.* logger's level
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    for name in RELOAD_LOGGERS:
        logger = importlib.import_module(name).logger  # fails if vLLM moves the modules that log
        assert logger.name == name
        logger.addHandler(handler)
        try:
            logger.warning("%s warns", name)
            logger.error("%s fails", name)
        finally:
            logger.removeHandler(handler)
    return seen


def test_quiet_by_default_and_verbose_on_request(monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    try:
        assert _emitted(verbose=False) == [f"{n} fails" for n in RELOAD_LOGGERS]
        assert logging.getLogger("vllm").level == logging.WARNING
        monkeypatch.delenv("VLLM_LOGGING_LEVEL")
        assert _emitted(verbose=True) == [m for n in RELOAD_LOGGERS for m in (f"{n} warns", f"{n} fails")]
    finally:
        vllm_log_level(False)


def _startup_emitted(verbose: bool) -> list[str]:
    vllm_log_level(verbose)
    from vllm.logger import _configure_vllm_root_logger

    _configure_vllm_root_logger()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    for name, known in KNOWN_STARTUP.items():
        logger = importlib.import_module(name).logger  # fails if vLLM moves the modules that log
        assert logger.name == name
        logger.addHandler(handler)
        try:
            for text in known:
                logger.warning("%s (and the rest of the message)", text)
            logger.warning("%s: something new", name)
        finally:
            logger.removeHandler(handler)
    return seen


def test_known_startup_warnings_dropped_by_text(monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    try:
        assert _startup_emitted(verbose=False) == [f"{n}: something new" for n in KNOWN_STARTUP]
        monkeypatch.delenv("VLLM_LOGGING_LEVEL")
        everything = _startup_emitted(verbose=True)
        assert len(everything) == sum(len(k) + 1 for k in KNOWN_STARTUP.values())
    finally:
        vllm_log_level(False)
