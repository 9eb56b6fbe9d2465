"""Log lines: one per event (text and JSON), configured secrets masked whoever logs them."""

import json
import logging
import sys

from proxy.config import config_from_dict
from proxy.ops.logs import JsonFormatter, TextFormatter, secrets_of


def record(msg: str, *args, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line with hunter2hunter2")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("cacheproxy.test", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_secrets_of_a_config():
    cfg = config_from_dict({
        "listen": {"password": "listen-pw", "users": {"app": "app-pw", "x": "ab"}},
        "upstream": {"url": "redis://default:up%40pw@cache:6379/0"},
        "backends": {"main": {"type": "postgres", "dsn": "postgresql://u:db%2Fpw@db/app"},
                     "ddb": {"type": "dynamodb"}}})
    assert secrets_of(cfg) >= {"listen-pw", "app-pw", "up@pw", "db%2Fpw", "db/pw"}
    assert "ab" not in secrets_of(cfg), "too short to mask without mangling every line"


def test_text_is_one_line_and_masked():
    fmt = TextFormatter(frozenset({"hunter2hunter2"}))
    line = fmt.format(record("reload refused:\n%s\n%s", "a.yaml: x: bad", "dsn postgresql://u:hunter2hunter2@h/d",
                             exc=True))
    assert "\n" not in line and "hunter2hunter2" not in line
    assert "a.yaml: x: bad | dsn postgresql://u:***@h/d" in line
    assert "ValueError: boom | second line with ***" in line


def test_json_is_one_object_per_line_and_masked():
    fmt = JsonFormatter(frozenset({'pa"ss\\word'}))
    line = fmt.format(record("auth with %s failed\nnext", 'pa"ss\\word', exc=True))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "auth with *** failed\nnext" and entry["level"] == "error"
    assert entry["logger"] == "cacheproxy.test" and "Traceback" in entry["exc"]
    assert 'pa"ss' not in line and "ss\\\\word" not in line
