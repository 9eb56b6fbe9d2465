"""Key templates and the router: parsing, typed matching, binary keys, first match wins, ambiguity."""

import random
import uuid
from types import SimpleNamespace

import pytest

from proxy.cache.templates import (
    INT64_MAX,
    Router,
    TemplateError,
    ambiguous,
    compare,
    compile_template,
    fill,
    template_params,
)

UID = "123e4567-e89b-12d3-a456-426614174000"


def routes(*keys):
    return [SimpleNamespace(key=k, name=f"r{i}") for i, k in enumerate(keys)]


# --------------------------------------------------------------------------------------- templates

def test_compile_exposes_params_and_prefix():
    t = compile_template("org:{org}:member:{uid:uuid}")
    assert t.template == "org:{org}:member:{uid:uuid}"
    assert t.params == ["org", "uid"]
    assert t.types == {"org": "str", "uid": "uuid"}
    assert t.prefix == b"org:"


def test_template_without_literal_prefix_is_allowed():
    t = compile_template("{tenant}:user:{id:int}")
    assert t.prefix == b""
    assert t.match(b"acme:user:7") == {"tenant": "acme", "id": 7}


@pytest.mark.parametrize("key,expected", [
    (b"user:42", {"id": 42}),
    (b"user:0", {"id": 0}),
    (b"user:-17", {"id": -17}),
    (b"user:" + str(INT64_MAX).encode(), {"id": INT64_MAX}),
    (b"user:abc", None),              # prefix matches, type does not
    (b"user:", None),
    (b"user:007", None),              # not canonical: one row, one key
    (b"user:-0", None),
    (b"user:1.5", None),
    (b"user:42:x", None),
    (b"user:42\n", None),             # fullmatch: no trailing newline slips through
    (b"user:" + str(INT64_MAX + 1).encode(), None),   # would not bind as bigint
    (b"USER:42", None),
])
def test_int_parameter(key, expected):
    assert compile_template("user:{id:int}").match(key) == expected


def test_int_value_has_python_type_int():
    assert type(compile_template("n:{id:int}").match(b"n:5")["id"]) is int


@pytest.mark.parametrize("text", [UID, UID.upper()])
def test_uuid_parameter_converts_to_uuid(text):
    params = compile_template("s:{sid:uuid}").match(b"s:" + text.encode())
    assert params == {"sid": uuid.UUID(UID)}
    assert isinstance(params["sid"], uuid.UUID)


@pytest.mark.parametrize("text", [UID.replace("-", ""), UID[:-1], UID + "0", "{" + UID + "}",
                                  UID.replace("1", "g", 1), "not-a-uuid"])
def test_uuid_parameter_rejects_non_canonical(text):
    assert compile_template("s:{sid:uuid}").match(b"s:" + text.encode()) is None


@pytest.mark.parametrize("key,expected", [
    (b"profile:alice", {"user_id": "alice"}),
    (b"profile:caf\xc3\xa9", {"user_id": "caf\u00e9"}),     # UTF-8 is decoded
    (b"profile:a b{c}", {"user_id": "a b{c}"}),
    (b"profile:", None),                                     # one or more characters
    (b"profile:a:b", None),                                  # ':' never inside a str parameter
])
def test_str_parameter(key, expected):
    assert compile_template("profile:{user_id}").match(key) == expected
    assert compile_template("profile:{user_id:str}").match(key) == expected


@pytest.mark.parametrize("key", [b"profile:\xff\xfe", b"profile:ab\x80", b"profile:\xc3"])
def test_non_utf8_str_parameter_is_not_matched(key):
    # Chosen behaviour: no match (the key passes through) instead of surrogateescape, since such a
    # string could never be bound as a database parameter.
    assert compile_template("profile:{user_id}").match(key) is None
    assert Router(routes("profile:{user_id}")).match(key) is None


def test_binary_bytes_in_literal_positions_do_not_crash():
    t = compile_template("user:{id:int}")
    for key in (b"\x00\xff", b"user:\xff", b"\xffuser:1", bytes(range(256))):
        assert t.match(key) is None


def test_escaped_braces_are_literal_for_hash_tags():
    t = compile_template("{{user}}:{id:int}")
    assert t.prefix == b"{user}:"
    assert t.params == ["id"]
    assert t.match(b"{user}:5") == {"id": 5}
    assert t.match(b"user:5") is None
    assert t.format({"id": 5}) == "{user}:5"


def test_literal_regex_characters_are_escaped():
    t = compile_template("a.b*{x:int}")
    assert t.match(b"a.b*1") == {"x": 1}
    assert t.match(b"axbb1") is None


@pytest.mark.parametrize("template,fragment", [
    ("", "empty"),
    ("user:{id", "never closed"),
    ("user:id}", "no matching"),
    ("user:{}", "empty name"),
    ("user:{:int}", "empty name"),
    ("user:{id:float}", "unknown type 'float'"),
    ("user:{a-b}", "not an identifier"),
    ("user:{id}:{id:int}", "more than once"),
    ("user:{a}{b:int}", "adjacent"),
    ("user:{a{b}", "inside a parameter"),
])
def test_template_errors(template, fragment):
    with pytest.raises(TemplateError, match=fragment):
        compile_template(template)


def test_template_error_is_a_value_error():
    assert issubclass(TemplateError, ValueError)


def test_format_and_fill():
    t = compile_template("org:{org}:member:{uid:uuid}")
    key = t.format({"org": "acme", "uid": uuid.UUID(UID.upper())})
    assert key == f"org:acme:member:{UID}"            # canonical lowercase
    assert t.match(key.encode()) == {"org": "acme", "uid": uuid.UUID(UID)}
    assert fill("{user_id}", {"user_id": "alice"}) == "alice"
    assert fill("USER#{id}#{kind}", {"id": 7, "kind": "x"}) == "USER#7#x"   # adjacency is fine in values
    with pytest.raises(TemplateError, match="no value for parameter 'id'"):
        fill("USER#{id}", {"user_id": 1})
    with pytest.raises(TemplateError):
        fill("{oops", {})


def test_template_params():
    assert template_params("{a}#{b:int}") == ["a", "b"]
    assert template_params("plain") == []


# ------------------------------------------------------------------------------------------ router

def test_router_first_match_wins():
    rs = routes("user:admin", "user:{id:int}", "user:{name}")
    router = Router(rs)
    assert router.match(b"user:admin") == (rs[0], {})
    assert router.match(b"user:12") == (rs[1], {"id": 12})
    assert router.match(b"user:bob") == (rs[2], {"name": "bob"})
    assert router.match(b"session:1") is None
    assert router.match(b"user:a:b") is None


def test_router_falls_through_when_parameters_do_not_convert():
    rs = routes("n:{id:int}", "n:{s}")
    big = str(INT64_MAX + 1).encode()
    assert Router(rs).match(b"n:" + big) == (rs[1], {"s": big.decode()})
    assert Router(rs).match(b"n:\xff") is None


def test_router_prefixes_are_the_cheap_first_test():
    router = Router(routes("user:{id:int}", "user:{name}", "profile:{p}"))
    assert router.prefixes == (b"user:", b"profile:")
    assert b"user:1".startswith(router.prefixes)
    assert not b"cache:1".startswith(router.prefixes)


def test_empty_router_matches_nothing():
    router = Router([])
    assert router.prefixes == ()
    assert router.match(b"user:1") is None
    assert len(router) == 0


def test_router_rejects_bad_templates():
    with pytest.raises(TemplateError):
        Router(routes("user:{id:nope}"))


def _reference_match(templates, key):
    for index, template in enumerate(templates):
        params = template.match(key)
        if params is not None:
            return index, params
    return None


def test_router_agrees_with_linear_scan_on_random_keys():
    """The single alternation regex must pick the same route as trying each template in order."""
    keys = ("a:{x:int}", "a:{x}:b", "a:{x:uuid}", "{t}:a", "a:b", "c:{y:int}-{z:int}", "c:{w}", "{{h}}:{q}")
    rs = routes(*keys)
    router = Router(rs)
    pieces = [b"a", b"b", b"c", b":", b"-", b"1", b"0", b"42", b"{h}", b"\xff", UID.encode(), b"x"]
    rng = random.Random(7)
    for _ in range(5000):
        key = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))
        expected = _reference_match(router.templates, key)
        got = router.match(key)
        if expected is None:
            assert got is None, key
        else:
            assert got == (rs[expected[0]], expected[1]), key


# --------------------------------------------------------------------------------------- ambiguity

@pytest.mark.parametrize("first,second,expected", [
    ("user:{id:int}", "user:{name}", False),     # narrower first: fine
    ("user:{name}", "user:{id:int}", True),      # the int route is shadowed
    ("user:admin", "user:{name}", False),
    ("user:{name}", "user:admin", True),
    ("user:{id}", "user:{uid}", True),           # same keys, second never used
    ("user:{id:int}", "user:{u:uuid}", False),   # disjoint types
    ("user:{id:int}", "profile:{id:int}", False),
    ("a:{x}:b", "a:{y}", False),                 # different number of ':'
    ("{a}:x", "y:{b}", True),                    # partial overlap on y:x
    ("u:{a}-{b}", "u:{c}", False),               # u:1-2 matches both, but the first is narrower
    ("u:{c}", "u:{a}-{b}", True),
    ("s:{a:int}", "s:{b:uuid}", False),
    ("s:{a}", "s:{b:uuid}", True),
    ("x:{a:int}:y", "x:{b:int}:z", False),
])
def test_ambiguous(first, second, expected):
    assert ambiguous(first, second) is expected


def test_compare_reports_containment():
    result = compare("user:{id:int}", "user:{name}")
    assert result.both and result.first_in_second and not result.second_in_first


def test_ambiguity_detection_finds_every_shared_key():
    """Soundness: whenever a random key matches two templates, compare() must report an overlap."""
    keys = ["a:{x:int}", "a:{x}", "{p}:b", "a:b", "a:{u:uuid}", "{p}-{q:int}", "a:{x}-1", "b:{y}:{z:int}"]
    templates = [compile_template(k) for k in keys]
    pieces = [b"a", b"b", b":", b"-", b"1", b"0", b"9", UID.encode()]
    rng = random.Random(11)
    shared = set()
    for _ in range(4000):
        key = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))
        hits = [i for i, t in enumerate(templates) if t.match(key) is not None]
        shared.update((i, j) for i in hits for j in hits if i < j)
    assert shared, "the random keys should exercise some overlaps"
    for i, j in shared:
        assert compare(templates[i], templates[j]).both, (keys[i], keys[j])
