"""The test fixtures' port allocator (tests/fixtures/ports.py): a port is handed out once per process,
cluster nodes get a port pair whose bus port nothing else hands out, and pytest-xdist workers draw
from disjoint slices (two workers starting servers at once must not pick the same port)."""

from __future__ import annotations

import pytest

from tests.fixtures import ports


@pytest.fixture
def one_process(monkeypatch):
    """Fresh allocators for a run without xdist (the whole ranges), not the ones of this test run."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    monkeypatch.setattr(ports, "_plain", None)
    monkeypatch.setattr(ports, "_cluster", None)


def test_free_port_never_hands_out_a_port_twice(one_process):
    taken = [ports.free_port() for _ in range(500)]
    assert len(set(taken)) == len(taken)


def test_cluster_port_never_hands_out_a_port_twice(one_process):
    # 1,000 nodes: a random pick among ~25,000 ports (the old cluster_port) repeats one almost surely.
    taken = [ports.cluster_port() for _ in range(1000)]
    assert len(set(taken)) == len(taken)


def test_cluster_bus_ports_never_meet_other_ports(one_process):
    plain = {ports.free_port() for _ in range(300)}
    nodes = {ports.cluster_port() for _ in range(300)}
    buses = {port + ports.BUS_OFFSET for port in nodes}
    assert not plain & nodes and not plain & buses and not nodes & buses


@pytest.mark.parametrize("count", [2, 3, 8])
def test_xdist_workers_draw_from_disjoint_slices(monkeypatch, count):
    slices = []
    for index in range(count):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(count))
        for low, high in (ports.PLAIN_RANGE, ports.CLUSTER_RANGE):
            piece = ports._Slice(low, high)
            slices.append(range(piece.low, piece.low + piece.size))
    for i, a in enumerate(slices):
        for b in slices[i + 1:]:
            assert not set(a) & set(b), (a, b)
