"""Configuration: schema.py (the pydantic models), checks.py (cross-field checks), problems.py (error
lines naming file, field and fix), sources.py (YAML, ${ENV}, overrides). Import from here."""

from .problems import ConfigError, Problem, StartupError
from .schema import (
    Admin,
    Config,
    Durability,
    DynamoBackend,
    Limits,
    Listen,
    Log,
    PostgresBackend,
    Route,
    RouteRead,
    RouteWrite,
    Shutdown,
    TTLPolicy,
    Upstream,
    UpstreamTLS,
    WriteBehind,
    parse_redis_url,
)
from .sources import config_from_dict, load_config

__all__ = [
    "Admin", "Config", "ConfigError", "Durability", "DynamoBackend", "Limits", "Listen", "Log", "PostgresBackend",
    "Problem", "Route", "RouteRead", "RouteWrite", "Shutdown", "StartupError", "TTLPolicy", "Upstream",
    "UpstreamTLS", "WriteBehind", "config_from_dict", "load_config", "parse_redis_url",
]
