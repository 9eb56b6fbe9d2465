"""The write-behind queue's layout: which stream a key's entries go to, in both upstream modes."""

from __future__ import annotations

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from proxy.writebehind.queue import Entry, Layout, slot_stream_name, slot_stream_pattern, slot_tags


def test_every_slot_has_a_stream_in_that_slot():
    tags = slot_tags()
    assert len(tags) == REDIS_CLUSTER_HASH_SLOTS
    assert all(key_slot(tag) == slot for slot, tag in enumerate(tags))
    assert all(key_slot(slot_stream_name("cacheproxy:wb", slot)) == slot for slot in range(0, 16384, 97))


def test_cluster_layout_puts_a_keys_stream_in_the_keys_slot():
    layout = Layout("cacheproxy:wb", 16, cluster=True)
    for key in (b"user:1", b"user:{42}:profile", b"session:abc", b"x" * 300):
        slot, partition, stream = layout.place(key)
        assert key_slot(stream) == key_slot(key) == slot
        assert partition == key_slot(key) % 16
    assert layout.place(b"{7}a") == layout.place(b"{7}b")


def test_single_node_layout_keeps_one_stream_per_partition():
    layout = Layout("q", 4, cluster=False)
    streams = {layout.place(b"user:%d" % i)[2] for i in range(200)}
    assert streams == {b"q:{0}", b"q:{1}", b"q:{2}", b"q:{3}"}


def test_sweep_pattern_escapes_glob_characters_of_the_prefix():
    assert slot_stream_pattern("cacheproxy:wb") == b"cacheproxy:wb:s:{*}"
    assert slot_stream_pattern("a*b[1]") == b"a\\*b\\[1\\]:s:{*}"


def test_entry_round_trips_its_fields_and_remembers_its_stream():
    fields = [b"k", b"user:1", b"o", b"hset", b"x", b"", b"name", b"Ann", b"k", b"dup"]
    entry = Entry.parse(b"1-0", fields, b"s1")
    assert entry.stream == b"s1"
    assert entry.pairs == [(b"name", b"Ann"), (b"k", b"dup")]
    assert entry.fields() == fields


def test_dirty_slots_ignore_members_that_are_not_slots_of_the_partition():
    layout = Layout("q", 16, cluster=True)
    members = [b"3", b"19", b"4", b"junk", b"-1", b"16384", b"99999", b"16383"]
    assert layout.dirty_slots(members) == [3, 19, 4, 16383]
    assert layout.dirty_slots(members, partition=3) == [3, 19]
    assert layout.dirty_slots(None) == []
