"""vLLM is quiet by default (rollout/vllm_process.py vllm_log_level): its logger at WARNING, and the two
reload loggers whose per-refit warnings are expected here at ERROR; logging.verbose keeps INFO."""
import importlib
import logging

import pytest

from r1_megatron.rollout.vllm_process import RELOAD_LOGGERS, vllm_log_level


def test_reload_logger_names_are_vllms_own():
    pytest.importorskip("vllm")
    for name in RELOAD_LOGGERS:  # fails if vLLM renames or moves the modules that log
        module = importlib.import_module(name)
        assert module.logger.name == name


def test_quiet_by_default_and_verbose_on_request(monkeypatch):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    loggers = [logging.getLogger(n) for n in ("vllm", *RELOAD_LOGGERS)]
    saved = [lg.level for lg in loggers]
    try:
        assert vllm_log_level(False) == "WARNING"
        assert logging.getLogger("vllm").level == logging.WARNING
        assert all(logging.getLogger(n).getEffectiveLevel() == logging.ERROR for n in RELOAD_LOGGERS)
        for lg in loggers:
            lg.setLevel(logging.NOTSET)
        monkeypatch.delenv("VLLM_LOGGING_LEVEL")
        assert vllm_log_level(True) == "INFO"
        assert all(logging.getLogger(n).getEffectiveLevel() == logging.INFO for n in RELOAD_LOGGERS)
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)
