"""The codec without sockets: requests fed whole, byte by byte and in random cuts must give the same frames."""

import random

import pytest

from proxy.protocol.resp import Error as ErrorReply
from proxy.protocol.resp import (
    RequestParser,
    encode_command,
    encode_reply,
    parse_reply,
    scan_replies,
    split_inline,
)


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


def test_encode_reply_round_trips_through_hiredis():
    value = {"a": [1, b"x", None], "b": "y"}
    assert parse_reply(encode_reply(value, 2)) == [b"a", [1, b"x", None], b"b", b"y"]
    assert parse_reply(encode_reply(value, 3)) == {b"a": [1, b"x", None], b"b": b"y"}
    assert encode_reply(ErrorReply("ERR bad")) == b"-ERR bad\r\n"


def test_huge_declared_array_is_refused_without_allocating():
    # hiredis would preallocate a 3-billion-slot list for this header; the parser must not let it.
    parser = RequestParser()
    frames, _ = parser.feed(b"*3000000000\r\n")
    assert frames == [] and parser.error == "invalid multibulk length"
    nested = RequestParser()
    frames, raw = nested.feed(b"*2\r\n$3\r\nGET\r\n*3000000000\r\n")
    assert raw is None and nested.error == "expected '$', got '*'"
