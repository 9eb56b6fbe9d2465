"""Redis's own argument checks for routed writes (proxy/writebehind/arguments.py), in Redis's order.

The integration test test_writebehind_errors.py compares the same replies with a real redis-server."""

import pytest

from proxy.writebehind.arguments import argument_error, redis_float, redis_integer, set_flags

DOC = b'{"name": "n"}'


@pytest.mark.parametrize("text, value", [
    (b"0", 0), (b"7", 7), (b"-7", -7), (b"9223372036854775807", 2 ** 63 - 1), (b"-9223372036854775808", -2 ** 63),
    (b"01", None), (b"-0", None), (b"+1", None), (b" 1", None), (b"1 ", None), (b"1.0", None), (b"", None),
    (b"9223372036854775808", None), (b"1e3", None), (b"abc", None)])
def test_integers_follow_string2ll(text, value):
    assert redis_integer(text) == value


@pytest.mark.parametrize("text, ok", [(b"1.5", True), (b"-2", True), (b"1e3", True), (b"inf", True),
                                      (b"nan", False), (b" 1", False), (b"1_0", False), (b"abc", False), (b"", False)])
def test_floats(text, ok):
    assert (redis_float(text) is not None) == ok


@pytest.mark.parametrize("args, expected", [
    ([b"SETEX", b"user:1", b"abc", b"{}"], b"-ERR value is not an integer or out of range\r\n"),
    ([b"SETEX", b"user:1", b"0", DOC], b"-ERR invalid expire time in 'setex' command\r\n"),
    ([b"PSETEX", b"user:1", b"-1", DOC], b"-ERR invalid expire time in 'psetex' command\r\n"),
    ([b"SETEX", b"user:1", b"abc"], b"-ERR wrong number of arguments for 'setex' command\r\n"),
    ([b"SET", b"user:1", b"x", b"EX", b"abc", b"NX", b"XX"], b"-ERR syntax error\r\n"),   # options before numbers
    ([b"SET", b"user:1", b"x", b"ex", b"0"], b"-ERR invalid expire time in 'set' command\r\n"),
    ([b"SET", b"user:1", b"x", b"EXAT", b"9223372036854775807"], b"-ERR invalid expire time in 'set' command\r\n"),
    ([b"INCRBY", b"c:1", b"x"], b"-ERR value is not an integer or out of range\r\n"),
    ([b"HINCRBYFLOAT", b"h:1", b"f", b"nan"], b"-ERR value is not a valid float\r\n"),
    ([b"SETRANGE", b"c:1", b"-1", b"x"], b"-ERR offset is out of range\r\n"),
    ([b"HSET", b"h:1", b"f"], b"-ERR wrong number of arguments for 'hset' command\r\n"),
])
def test_errors_in_redis_order(args, expected):
    assert argument_error(args[0].upper(), args) == expected


@pytest.mark.parametrize("args", [
    [b"SET", b"k", b"v"], [b"SET", b"k", b"v", b"NX", b"GET", b"EX", b"10"], [b"SET", b"k", b"v", b"EX", b"1",
                                                                              b"EX", b"2"],
    [b"SET", b"k", b"v", b"KEEPTTL", b"XX"], [b"SET", b"k", b"v", b"PXAT", b"9223372036854775807"],
    [b"SETEX", b"k", b"10", b"v"], [b"INCRBYFLOAT", b"k", b"-1.5e2"], [b"SETRANGE", b"k", b"0", b"x"],
    [b"HSET", b"h", b"f", b"v", b"g", b"w"], [b"GETDEL", b"k"]])
def test_good_arguments_pass(args):
    assert argument_error(args[0].upper(), args) is None


def test_set_flags_report_the_expiry_argument():
    assert set_flags([b"SET", b"k", b"v", b"px", b"100", b"nx"]) == ({b"PX", b"NX"}, b"100")
