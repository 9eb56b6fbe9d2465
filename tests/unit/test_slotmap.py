"""The cluster map and redirects parsed without sockets."""

from __future__ import annotations

from proxy.upstream.slotmap import Redirect, from_shards, from_slots, parse_redirect


def test_redirects():
    assert parse_redirect(b"-MOVED 3999 10.0.0.2:7001\r\n") == Redirect(False, 3999, "10.0.0.2", 7001)
    assert parse_redirect(b"-ASK 12 [::1]:7002\r\n".replace(b"[::1]", b"::1")) == Redirect(True, 12, "::1", 7002)
    assert parse_redirect(b"-MOVED 5 :7003\r\n") == Redirect(False, 5, "127.0.0.1", 7003)
    for bad in (b"-MOVED\r\n", b"-MOVED x 1.2.3.4:5\r\n", b"-ASK 1 host\r\n", b"-ERR MOVED 1 a:1\r\n", b"+OK\r\n"):
        assert parse_redirect(bad) is None


def test_cluster_shards_leave_out_nodes_that_are_not_online():
    reply = [[b"slots", [0, 8191], b"nodes", [
        [b"id", b"a", b"port", 7000, b"ip", b"10.0.0.1", b"endpoint", b"10.0.0.1", b"role", b"master",
         b"health", b"online"],
        [b"id", b"b", b"port", 7003, b"ip", b"10.0.0.4", b"endpoint", b"?", b"role", b"replica",
         b"health", b"online"],
        [b"id", b"c", b"port", 7004, b"ip", b"10.0.0.5", b"endpoint", b"10.0.0.5", b"role", b"replica",
         b"health", b"fail"]]],
        [b"slots", [8192, 16383], b"nodes", [
            [b"id", b"d", b"port", 7001, b"endpoint", b"", b"role", b"master", b"health", b"online"]]]]
    assert from_shards(reply, "seed") == [
        ([(0, 8191)], ("10.0.0.1", 7000), [("10.0.0.4", 7003)]),
        ([(8192, 16383)], ("seed", 7001), []),
    ]


def test_cluster_slots():
    reply = [[0, 100, [b"10.0.0.1", 7000, b"id"], [b"", 7003, b"id2"]]]
    assert from_slots(reply, "seed") == [([(0, 100)], ("10.0.0.1", 7000), [("seed", 7003)])]
