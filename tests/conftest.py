"""Shared pytest setup: fixture plugins, markers, and the CACHEPROXY_TEST_DIRECT switch.

``CACHEPROXY_TEST_DIRECT=1`` points the proxy fixtures straight at redis-server (no proxy), which
checks the tests themselves against real Redis. Tests marked ``proxy_only`` are skipped then.
"""

import os
from pathlib import Path

import pytest

_FIXTURES = Path(__file__).parent / "fixtures"
_PLUGINS = ["redis_server", "redis_cluster", "proxy", "postgres", "moto", "throwaway_pg"]

# Register only the fixture modules that exist yet (others are written in parallel).
pytest_plugins = [f"tests.fixtures.{name}" for name in _PLUGINS if (_FIXTURES / f"{name}.py").exists()]


def _direct_mode() -> bool:
    return os.environ.get("CACHEPROXY_TEST_DIRECT", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "proxy_only: tests behaviour only the proxy has (auth, limits, upstream down, shutdown, CLI); "
        "skipped when CACHEPROXY_TEST_DIRECT=1",
    )


def pytest_collection_modifyitems(config, items):
    if not _direct_mode():
        return
    skip = pytest.mark.skip(reason="proxy-only behaviour; CACHEPROXY_TEST_DIRECT=1 runs against Redis itself")
    for item in items:
        if "proxy_only" in item.keywords:
            item.add_marker(skip)
