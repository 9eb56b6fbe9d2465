"""The request parser against the model of Redis's own (tests/fixtures/redis_model.py), on fuzzed input.

A short deterministic run lives here; scripts/fuzz_parser.py runs a million inputs. The model itself is
checked against a real redis-server in tests/integration/test_parser_model.py, and the last test here
checks that the harness notices a parser that is lenient in the ways the integrity issue found.
"""

import pytest

import proxy.protocol.request as request
from tests.fixtures import parser_fuzz

SEED = 20261201
INPUTS = 4000      # about 2 s


def test_parser_reads_fuzzed_input_exactly_as_redis():
    report = parser_fuzz.run(SEED, INPUTS)
    assert not report.divergences, "\n".join(f"{case.chunks!r} unauthenticated={case.unauthenticated} "
                                             f"max_bulk={case.max_bulk}\n  {problem}"
                                             for case, problem in report.divergences)
    # The run reached what matters: commands read, every kind of protocol error, requests left
    # waiting, and reads forwarded as they came.
    assert report.inputs == INPUTS and report.commands > INPUTS
    kinds = {message.split(",")[0] for message in report.errors}
    assert {"invalid multibulk length", "invalid bulk length", "expected '$'", "unbalanced quotes in request",
            "unauthenticated multibulk length", "unauthenticated bulk length"} <= kinds
    assert report.pending > 0 and report.forwarded_raw > 0


def _lenient_string2ll(buf, start, end):
    try:
        return int(buf[start:end])              # Python's int(): signs, spaces, zeros, underscores
    except ValueError:
        return None


def _no_canonical_check(self, data, frames):
    reader = self._reader
    reader.feed(data)
    got = []
    while (frame := reader.gets()) is not False:
        got.append(frame)
    frames += got
    return len(data)                            # whatever hiredis took, forwarded as it came


SABOTAGE = {
    "lengths read by int()": (request, "string2ll", _lenient_string2ll),
    "\\v and \\f end an inline argument": (request, "_ENDS_WORD", frozenset(b" \n\r\t\v\f")),
    "hiredis trusted blindly": (request.RequestParser, "_fast", _no_canonical_check),
}


@pytest.mark.parametrize("target, name, replacement", list(SABOTAGE.values()), ids=list(SABOTAGE))
def test_the_harness_catches_a_lenient_parser(monkeypatch, target, name, replacement):
    monkeypatch.setattr(target, name, replacement)
    found = 0
    for case in parser_fuzz.cases(SEED, 3000):
        try:
            found += parser_fuzz.divergence(case) is not None
        except Exception:           # a sabotaged parser may also crash: that counts as caught
            found += 1
        if found >= 3:
            break
    assert found >= 3
