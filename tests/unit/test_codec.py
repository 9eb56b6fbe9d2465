"""The codec without sockets: requests fed whole, byte by byte and in random cuts must give the same frames,
read exactly as Redis reads them (the expectations below were checked against redis-server 7.0)."""

import random

import pytest

from proxy.protocol.request import (
    ProtocolError,
    RequestParser,
    split_inline,
    string2ll,
    unauthenticated_error,
)
from proxy.protocol.resp import encode_command, encode_reply, parse_reply, scan_replies


def feed_all(parser, chunks):
    frames, raws = [], []
    for chunk in chunks:
        got, raw = parser.feed(chunk)
        frames += got
        raws.append(raw)
    return frames, raws


def test_whole_pipeline_takes_fast_path_and_returns_raw():
    data = encode_command([b"SET", b"k", b"v"]) + encode_command([b"GET", b"k"])
    frames, raw = RequestParser().feed(data)
    assert frames == [[b"SET", b"k", b"v"], [b"GET", b"k"]]
    assert raw == data


@pytest.mark.parametrize("seed", range(20))
def test_random_cuts_give_same_frames_and_raw_bytes(seed):
    rng = random.Random(seed)
    commands = [[bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))) for _ in range(rng.randrange(1, 5))]
                for _ in range(50)]
    for args in commands:
        args[0] = args[0] or b"X"
    data = b"".join(encode_command(c) for c in commands)
    cuts = sorted(rng.sample(range(1, len(data)), 30))
    chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)], strict=True)]
    parser = RequestParser()
    frames, raws = feed_all(parser, chunks)
    assert frames == commands
    # Every raw is exactly the encoding of the frames it came with: forwarding it is lossless.
    assert b"".join(r for r in raws if r is not None) == data


def test_byte_by_byte():
    data = encode_command([b"HSET", b"h", b"f\r\n", b""]) * 3
    frames, _ = feed_all(RequestParser(), [data[i:i + 1] for i in range(len(data))])
    assert frames == [[b"HSET", b"h", b"f\r\n", b""]] * 3


def test_inline_commands_and_quotes():
    parser = RequestParser()
    frames, raw = parser.feed(b'PING\r\nSET a "b c\\x41\\n"\r\n\r\nGET \'it\\\'s\'\n')
    assert frames == [[b"PING"], [b"SET", b"a", b"b cA\n"], [b"GET", b"it's"]]
    assert raw is None   # inline commands are re-encoded before they go upstream


def test_inline_unbalanced_quotes_is_protocol_error():
    parser = RequestParser()
    parser.feed(b'SET a "oops\r\n')
    assert parser.error == "unbalanced quotes in request"


def test_status_element_is_rejected_like_redis():
    parser = RequestParser()
    frames, _ = parser.feed(b"*2\r\n+GET\r\n$1\r\nk\r\n")
    assert frames == []
    assert parser.error == "expected '$', got '+'"


def test_balanced_wrong_types_never_take_the_fast_path():
    # "+" elements make a frame shorter, "=" verbatim ones longer; together they can match the
    # canonical length. Such a chunk must still be refused, not forwarded raw.
    data = b"*3\r\n$3\r\nSET\r\n+ab\r\n=7\r\ntxt:abc\r\n"
    parser = RequestParser()
    frames, raw = parser.feed(data)
    assert raw is None and parser.error is not None


def test_frames_before_an_error_are_kept():
    parser = RequestParser()
    frames, _ = parser.feed(encode_command([b"PING"]) + b"*1\r\n$x\r\n")
    assert frames == [[b"PING"]]
    assert parser.error == "invalid bulk length"


def test_bulk_limit_is_enforced_on_the_header_alone():
    parser = RequestParser(max_bulk=1024)
    frames, _ = parser.feed(b"*2\r\n$3\r\nSET\r\n$2000\r\n")
    assert parser.error == "invalid bulk length"


def test_multibulk_limit():
    parser = RequestParser(max_multibulk=10)
    parser.feed(b"*11\r\n")
    assert parser.error == "invalid multibulk length"


def test_oversized_header_line():
    parser = RequestParser()
    parser.feed(b"*" + b"1" * 70000)
    assert parser.error == "too big mbulk count string"


def test_empty_multibulk_is_ignored():
    frames, raw = RequestParser().feed(b"*0\r\n" + encode_command([b"PING"]))
    assert frames == [[b"PING"]]
    assert raw is None


def test_large_value_in_many_chunks():
    value = bytes(range(256)) * 4096
    data = encode_command([b"SET", b"big", value])
    parser = RequestParser()
    frames, raws = feed_all(parser, [data[i:i + 65536] for i in range(0, len(data), 65536)])
    assert frames == [[b"SET", b"big", value]]
    assert raws[-1] == data


def test_pending_returns_unparsed_bytes():
    parser = RequestParser()
    parser.feed(b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nc")
    assert parser.pending() == b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nc"


@pytest.mark.parametrize("reply", [
    b"+OK\r\n", b"-ERR x\r\n", b":12\r\n", b"$-1\r\n", b"$0\r\n\r\n", b"$5\r\nhe\r\no\r\n", b"*-1\r\n", b"*0\r\n",
    b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n", b"%2\r\n+a\r\n:1\r\n+b\r\n,1.5\r\n", b"~1\r\n#t\r\n", b"_\r\n",
    b"(123456789012345678901234567890\r\n", b"=7\r\ntxt:abc\r\n", b"!5\r\nERR x\r\n",
    b"|1\r\n+key\r\n+val\r\n$1\r\nx\r\n", b">3\r\n+message\r\n+ch\r\n+hi\r\n:1\r\n",
])
def test_scan_finds_reply_boundaries(reply):
    data = reply * 3 + b"+NEXT\r\n"
    pos, left = scan_replies(data, 0, 3)
    assert (pos, left) == (len(reply) * 3, 0)
    # Cut anywhere inside: the walk reports "more needed" and resumes to the same end.
    for cut in range(len(reply) * 3):
        pos, left = scan_replies(data[:cut], 0, 3)
        assert left > 0
        pos, left = scan_replies(data, pos, left)
        assert (pos, left) == (len(reply) * 3, 0)


def test_split_inline_plain():
    assert split_inline(b"  a  bb\tc ") == [b"a", b"bb", b"c"]


@pytest.mark.parametrize("line, args", [
    (b"ECHO a\vb", [b"ECHO", b"a\vb"]),             # \v and \f do not end an argument ...
    (b"ECHO\fx y", [b"ECHO\fx", b"y"]),
    (b"\v\fECHO \v\f y", [b"ECHO", b"y"]),        # ... but are skipped between arguments
    (b"ECHO a\rb", [b"ECHO", b"a", b"b"]),           # a lone \r does end one
    (b'SET "a\\x4" \'b\\\'c\'', [b"SET", b"ax4", b"b'c"]),
    (b'SET ab"c d"', [b"SET", b"abc d"]),             # a quote inside a word opens a quoted part
    (b'ECHO "a"\vb', [b"ECHO", b"a", b"b"]),          # isspace() may follow a closing quote
    (b"ECHO \x85\xa0", [b"ECHO", b"\x85\xa0"]),     # not spaces in the C locale
])
def test_split_inline_like_sdssplitargs(line, args):
    assert split_inline(line) == args


@pytest.mark.parametrize("line", [b'ECHO "a"b', b"ECHO 'a'b", b'ECHO "a', b"ECHO 'a\\'", b'ECHO "a\\"'])
def test_split_inline_unbalanced_like_sdssplitargs(line):
    with pytest.raises(ProtocolError, match="unbalanced quotes in request"):
        split_inline(line)


def test_encode_reply_round_trips_through_hiredis():
    value = {"a": [1, b"x", None], "b": "y"}
    assert parse_reply(encode_reply(value, 2)) == [b"a", [1, b"x", None], b"b", b"y"]
    assert parse_reply(encode_reply(value, 3)) == {b"a": [1, b"x", None], b"b": b"y"}


def test_huge_declared_array_is_refused_without_allocating():
    # hiredis would preallocate a 3-billion-slot list for this header; the parser must not let it.
    parser = RequestParser()
    frames, _ = parser.feed(b"*3000000000\r\n")
    assert frames == [] and parser.error == "invalid multibulk length"
    nested = RequestParser()
    frames, raw = nested.feed(b"*2\r\n$3\r\nGET\r\n*3000000000\r\n")
    assert raw is None and nested.error == "expected '$', got '*'"


# -- exactly as strict as Redis (integrity issue, items 2, 10, 13) ------------------------------------

def feed_until_error(parser, data):
    frames, _ = parser.feed(data)
    return frames, parser.error


@pytest.mark.parametrize("data, error", [
    (b"*2 \r\n", "invalid multibulk length"),
    (b"*+1\r\n", "invalid multibulk length"),
    (b"*01\r\n", "invalid multibulk length"),
    (b"*1_0\r\n", "invalid multibulk length"),
    (b"*-0\r\n", "invalid multibulk length"),
    (b"*2147483648\r\n", "invalid multibulk length"),
    (b"*1\r\n$06\r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$0_1\r\n", "invalid bulk length"),
    (b"*1\r\n$ 4\r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$4 \r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$+4\r\nPING\r\n", "invalid bulk length"),
    (b"*1\r\n$-1\r\n", "invalid bulk length"),
    # Redis ends the count at the first \r and skips the next byte: the bulk line then starts at \n.
    (b"*2\r\r\n$4\r\nECHO\r\n$1\r\na\r\n", "expected '$', got '\n'"),
    (b"*1\r\n:5\r\n", "expected '$', got ':'"),
])
def test_lengths_redis_refuses_are_refused_with_its_words(data, error):
    frames, got = feed_until_error(RequestParser(), data)
    assert (frames, got) == ([], error)


def test_smuggled_command_is_seen_where_redis_sees_it():
    # The attack: a length line ending in 28 \r. A parser that reads "40\r...\r\n" as 40 takes
    # "SHUTDOWN NOSAVE" as part of the value; Redis ends the line at the first \r, skips one byte, and
    # runs the SHUTDOWN. The proxy must read what Redis reads (and so refuse the SHUTDOWN itself).
    value = b"a" * 13 + b"xx" + b"SHUTDOWN NOSAVE\r\n" + b"PING    "
    data = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$40" + b"\r" * 28 + b"\n" + value + b"\r\n"
    parser = RequestParser()
    frames, raw = parser.feed(data)
    assert frames == [[b"SET", b"k", b"\r" * 26 + b"\n" + b"a" * 13], [b"SHUTDOWN", b"NOSAVE"], [b"PING"]]
    assert raw is None and parser.error is None


@pytest.mark.parametrize("data, frames", [
    (b"*1\r\n$4\r\nPINGxx", [[b"PING"]]),                   # two bytes after a bulk: skipped unread
    (b"*1\rX$4\rYPING\r\n", [[b"PING"]]),                   # the byte after a length's \r: skipped
    (b"*2\rx$4\rxECHO\rx$1\r\rz\r\r", [[b"ECHO", b"z"]]),
])
def test_leniencies_are_read_like_redis_and_never_forwarded_raw(data, frames):
    for chunks in ([data], [data[i:i + 1] for i in range(len(data))]):
        parser = RequestParser()
        got, raws = feed_all(parser, chunks)
        assert got == frames and parser.error is None
        assert raws == [None] * len(chunks), "non-canonical bytes must be re-encoded, not forwarded"


@pytest.mark.parametrize("ignored", [b"*0\r\n", b"*-7\r\n", b"\r\n", b" \v\r\n"])
def test_ignored_requests_get_no_frame_and_are_not_forwarded(ignored):
    data = ignored + encode_command([b"PING"])
    frames, raw = RequestParser().feed(data)
    assert frames == [[b"PING"]] and raw is None       # Redis sends no reply for them: nor may Redis see them


@pytest.mark.parametrize("data, error", [
    (b"*4\r\n$6\r\nSTRLEN\r\n*0\r\n*0\r\n*1\r\n$1\r\na\r\n", "expected '$', got '*'"),  # hiredis takes it
    (b"*3\r\n$3\r\nSET\r\n+ab\r\n=7\r\ntxt:abc\r\n", "expected '$', got '+'"),
    (b"*2\r\n$3\r\nGET\r\n(12\r\n", "expected '$', got '('"),
    (b"*2\r\n$3\r\nGET\r\n%1\r\n$1\r\na\r\n$1\r\nb\r\n", "expected '$', got '%'"),
    (b"*1\r\n$4\r\nPING\r\n>1\r\n$1\r\na\r\n", None),    # PING, then an inline request ">1"
])
def test_only_bulk_strings_inside_a_request(data, error):
    parser = RequestParser()
    frames, raw = parser.feed(data)
    assert parser.error == error
    assert raw is None


def test_nul_never_ends_a_line_redis_waits_then_refuses():
    parser = RequestParser()
    assert parser.feed(b"ECHO a\0b\r\nPING\r\n") == ([], None)     # strchr stops at the NUL
    assert parser.error is None and parser.partial
    assert parser.feed(b"x" * 65536) == ([], None)
    assert parser.error == "too big inline request"
    header = RequestParser()
    assert header.feed(b"*1\0\r\n$4\r\nPING\r\n") == ([], None) and header.partial
    header.feed(b"y" * 65536)
    assert header.error == "too big mbulk count string"


def test_expected_dollar_only_once_the_line_is_complete():
    parser = RequestParser()
    assert parser.feed(b"*1\r\nX") == ([], None) and parser.error is None
    assert parser.feed(b"\r") == ([], None) and parser.error is None     # Redis waits for one more byte
    parser.feed(b"x")
    assert parser.error == "expected '$', got 'X'"


def test_bulk_limit_applies_to_the_fast_path_too():
    data = encode_command([b"SET", b"k", b"v" * 11])
    parser = RequestParser(max_bulk=10)
    frames, raw = parser.feed(data)
    assert (frames, raw, parser.error) == ([], None, "invalid bulk length")


def test_a_dead_parser_reads_nothing_more():
    parser = RequestParser()
    parser.feed(b"*1\r\n$x\r\n")
    assert parser.error == "invalid bulk length"
    assert parser.feed(encode_command([b"PING"])) == ([], None)
    assert parser.buffered == 0


# -- the fast path ------------------------------------------------------------------------------------

def test_read_ending_inside_a_request_keeps_its_complete_frames_raw():
    first, second, third = (encode_command([b"SET", b"k%d" % i, b"v" * 20]) for i in range(3))
    parser = RequestParser()
    frames, raw = parser.feed(first + second[:10])
    assert frames == [[b"SET", b"k0", b"v" * 20]] and raw == first
    assert parser.partial and parser.buffered == 10
    frames, raw = parser.feed(second[10:] + third)
    assert frames == [[b"SET", b"k1", b"v" * 20], [b"SET", b"k2", b"v" * 20]]
    assert raw == second + third and not parser.partial


def test_canonical_then_lenient_in_one_read_is_not_forwarded_raw():
    data = encode_command([b"PING"]) + b"*1\r\n$4\r\nPINGxx"
    frames, raw = RequestParser().feed(data)
    assert frames == [[b"PING"], [b"PING"]] and raw is None


# -- connections that must still AUTH (Redis: authRequired) -------------------------------------------

@pytest.mark.parametrize("data, error", [
    (b"*11\r\n", "unauthenticated multibulk length"),
    (b"*2\r\n$4\r\nECHO\r\n$16385\r\n", "unauthenticated bulk length"),
])
def test_unauthenticated_limits(data, error):
    parser = RequestParser(unauthenticated=True)
    assert feed_until_error(parser, data) == ([], error)
    ok = RequestParser(unauthenticated=True)
    frames, _ = ok.feed(encode_command([b"ECHO", b"v" * 16384]) + encode_command([b"DEL"] + [b"k"] * 9))
    assert len(frames) == 2 and ok.error is None


def test_unauthenticated_limit_waits_for_an_auth_pipelined_before_it():
    # Redis runs AUTH before it reads the next request: the big one after it is allowed if AUTH passed.
    auth = encode_command([b"AUTH", b"pw"])
    big = encode_command([b"MSET"] + [b"k", b"v"] * 6)
    parser = RequestParser(unauthenticated=True)
    frames, _ = parser.feed(auth + big)
    assert frames == [[b"AUTH", b"pw"]] and parser.deferred and parser.error is None
    parser.unauthenticated = False          # the session ran AUTH: it passed
    frames, _ = parser.feed(b"")
    assert frames == [[b"MSET"] + [b"k", b"v"] * 6] and not parser.deferred
    failed = RequestParser(unauthenticated=True)
    failed.feed(auth + big)
    assert failed.deferred
    assert failed.feed(b"") == ([], None)   # AUTH failed: Redis's error, where Redis gives it
    assert failed.error == "unauthenticated multibulk length"


def test_losing_authentication_mid_request_applies_the_limits():
    parser = RequestParser()
    parser.feed(b"*12\r\n$3\r\nDEL\r\n")
    parser.unauthenticated = True           # RESET ran meanwhile
    parser.feed(b"$1\r\nk\r\n")
    assert parser.error == "unauthenticated multibulk length"
    assert unauthenticated_error([b"DEL"] + [b"k"] * 10) == "unauthenticated multibulk length"
    assert unauthenticated_error([b"SET", b"k", b"v" * 16385]) == "unauthenticated bulk length"
    assert unauthenticated_error([b"SET", b"k", b"v" * 16384]) is None


# -- memory: what is held, and the cap (item 10) ------------------------------------------------------

def test_memory_follows_bytes_received_not_lengths_declared():
    header = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$150000000\r\n"
    parser = RequestParser()
    parser.feed(header + b"x" * 1000)
    assert parser.partial and parser.buffered == len(header) + 1000
    assert parser.error is None


def test_query_buffer_cap_is_checked_on_the_declared_length():
    parser = RequestParser(max_query_buffer=1 << 20)
    frames, _ = parser.feed(encode_command([b"PING"]) + b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1048576\r\n")
    assert frames == [[b"PING"]]
    assert parser.error == "request too big for the query buffer (limits.max_query_buffer)"
    fits = RequestParser(max_query_buffer=1 << 20)
    frames, _ = fits.feed(encode_command([b"SET", b"k", b"v" * ((1 << 20) - 40)]))
    assert len(frames) == 1 and fits.error is None


def test_query_buffer_cap_holds_for_lines_too():
    parser = RequestParser(max_inline=1 << 20, max_query_buffer=4096)
    parser.feed(b"a" * 5000)
    assert parser.error == "request too big for the query buffer (limits.max_query_buffer)"


@pytest.mark.parametrize("text, value", [
    (b"0", 0), (b"1", 1), (b"-1", -1), (b"9223372036854775807", 2**63 - 1),
    (b"-9223372036854775808", -2**63), (b"9223372036854775808", None), (b"-9223372036854775809", None),
    (b"-0", None), (b"01", None), (b"+1", None), (b" 1", None), (b"1 ", None), (b"1_0", None), (b"", None),
    (b"-", None), (b"\xd9\xa1", None), (b"00000000000000000001", None), (b"1" * 21, None),
])
def test_string2ll(text, value):
    assert string2ll(text, 0, len(text)) == value
