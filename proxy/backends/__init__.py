"""Backends: one module per database, all behind backends/base.py."""


def create_backend(name: str, cfg):
    """A backend object for a config entry (`type: postgres | dynamodb`), not yet started."""
    if cfg.type == "postgres":
        from .postgres import PostgresBackend
        return PostgresBackend(name, cfg)
    if cfg.type == "dynamodb":
        from .dynamodb import DynamoBackend
        return DynamoBackend(name, cfg)
    raise ValueError(f"unknown backend type {cfg.type!r}")
