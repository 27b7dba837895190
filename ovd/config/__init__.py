"""Typed configs: the schema, YAML loading with `_BASE_`, overrides."""

from ovd.config.loading import ConfigError, config_to_yaml, load_config, parse_overrides, save_config
from ovd.config.schema import Config

__all__ = ["Config", "ConfigError", "config_to_yaml", "load_config", "parse_overrides", "save_config"]
