"""Shared pytest setup: fixture plugins, markers, and the CACHEPROXY_TEST_DIRECT switch.

``CACHEPROXY_TEST_DIRECT=1`` points the proxy fixtures straight at redis-server (no proxy), which
checks the tests themselves against real Redis. Tests marked ``proxy_only`` are skipped then.
"""

import os

import pytest

# The fixture modules, registered as plugins: a test takes their fixtures by name, without importing
# them (an import would shadow the fixture in the test's signature). A module missing here is an
# error at startup, not a fixture that silently does not exist.
pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.redis_cluster",
    "tests.fixtures.proxy",
    "tests.fixtures.inprocess",
    "tests.fixtures.postgres",
    "tests.fixtures.moto",
    "tests.fixtures.throwaway_pg",
]


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
