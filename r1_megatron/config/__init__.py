"""Typed, strict job configuration."""

from r1_megatron.config.loader import config_from_resolved, load_card, load_config, save_resolved
from r1_megatron.config.schema import ConfigError, JobConfig, ModelConfig
from r1_megatron.config.validate import validate

__all__ = [
    "ConfigError",
    "JobConfig",
    "ModelConfig",
    "config_from_resolved",
    "load_card",
    "load_config",
    "save_resolved",
    "validate",
]
