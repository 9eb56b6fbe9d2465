"""upstream/resend.py: which requests lost with their connection may be sent again."""

from proxy.protocol.commands import CommandTable
from proxy.protocol.resp import encode_command
from proxy.upstream.resend import RESEND_MAX_BYTES, resendable

TABLE = CommandTable([
    [b"get", 2, [b"readonly", b"fast"], 1, 1, 1],
    [b"mget", -2, [b"readonly", b"fast"], 1, -1, 1],
    [b"incr", 2, [b"write", b"fast"], 1, 1, 1],
])


def request(*commands) -> bytes:
    return b"".join(encode_command(c) for c in commands)


def test_reads_on_the_wire_go_again():
    data = request([b"GET", b"a"], [b"MGET", b"a", b"b"])
    assert resendable(TABLE, data, 2, unsent=False) == data


def test_a_write_on_the_wire_does_not():
    assert resendable(TABLE, request([b"GET", b"a"], [b"INCR", b"n"]), 2, unsent=False) is None


def test_anything_that_never_left_goes_again():
    data = request([b"INCR", b"n"], [b"SOMETHING", b"new"])
    assert resendable(TABLE, data, 2, unsent=True) == data


def test_unknown_commands_and_no_table_do_not():
    assert resendable(TABLE, request([b"SOMETHING", b"new"]), 1, unsent=False) is None
    assert resendable(None, request([b"GET", b"a"]), 1, unsent=False) is None


def test_only_the_replies_not_streamed_yet_go_again():
    data = request([b"INCR", b"n"], [b"GET", b"a"], [b"GET", b"b"])
    assert resendable(TABLE, data, 2, unsent=False) == request([b"GET", b"a"], [b"GET", b"b"])


def test_nothing_kept_nothing_sent():
    assert resendable(TABLE, None, 1, unsent=True) is None
    assert RESEND_MAX_BYTES >= 64 * 1024
