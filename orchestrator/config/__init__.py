"""Config: one typed tree (``schema``) loaded from YAML with overrides (``loader``)."""

from orchestrator.config.loader import load_config, parse_override, validate_config
from orchestrator.config.schema import Config

__all__ = ["Config", "load_config", "parse_override", "validate_config"]
