"""The metrics catalogue (proxy/ops/metrics.py) is the whole truth: every family /metrics exports is
declared there with its type, and every declared family is exported by a proxy that uses every part."""

from __future__ import annotations

import json

import pytest

from proxy.ops.metrics import CATALOGUE
from tests.fixtures.helpers import metrics, wait_for
from tests.fixtures.writebehind import start

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(60)]


def exported(text: str) -> dict[str, str]:
    """family name -> type, from the # TYPE lines (counters lose their _total suffix)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            if not name.endswith("_created"):       # prometheus_client's creation-time companions
                out[name.removesuffix("_total")] = kind
    return out


def test_every_exported_family_is_in_the_catalogue_and_the_other_way_round(make_proxy, redis_server, pg):
    p = start(make_proxy, redis_server, pg)
    c = p.client(protocol=2)
    c.set("user:1", json.dumps({"name": "a", "email": "a@x.org"}))
    c.get("user:2")
    c.get("plain")
    wait_for(lambda: "cacheproxy_writebehind_landed_total{" in metrics(p), what="a landed write")
    families = exported(metrics(p))
    declared = {family.name: family.type for family in CATALOGUE}
    assert families == declared
