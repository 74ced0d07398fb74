"""Typed job configuration: one pydantic model per section, strict YAML loading with every problem at once."""

from finetune.config.errors import ConfigError, ConfigProblem
from finetune.config.job import JobConfig
from finetune.config.loader import dump_config, load_config, load_config_text

__all__ = ["ConfigError", "ConfigProblem", "JobConfig", "dump_config", "load_config", "load_config_text"]
