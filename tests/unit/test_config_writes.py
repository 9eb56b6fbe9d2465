"""Config checks of routes' writes: string routes name the one place their value goes; the
versions table (write fencing) is a plain identifier; max_attempts is still accepted."""

from tests.unit.test_config import PG, assert_problem, config_from_dict, error_of, with_routes


def string_route(write: dict, read: dict | None = None, backend: str = "main") -> dict:
    base = {"query": "SELECT v FROM kv WHERE k = $1", "as": "string"} if backend == "main" else \
        {"table": "Kv", "key": {"K": "{k}"}, "as": "string"}
    return {"key": "kv:{k}", "backend": backend, "read": {**base, **(read or {})},
            "write": {"mode": "write-behind", **write}}


def test_a_string_route_with_two_fields_is_refused():
    err = error_of(with_routes(string_route({"table": "kv", "key_columns": ["k"], "fields": ["v", "w"]})))
    assert_problem(err, "routes[0].write.fields", "a string route stores one value", "(v, w)")


def test_a_string_route_with_one_field_and_no_column_is_fine():
    cfg = config_from_dict(with_routes(string_route({"table": "kv", "key_columns": ["k"], "fields": ["v"]})))
    assert cfg.routes[0].write.fields == ["v"]
    config_from_dict(with_routes(string_route({"upsert": "INSERT INTO kv VALUES ($1, $2)", "delete_on_del": False})))


def test_a_dynamodb_string_route_needs_its_attribute():
    err = error_of(with_routes(string_route({}, backend="ddb")))
    assert_problem(err, "routes[0].read.column", "needs the attribute that holds the value")
    err = error_of(with_routes(string_route({"fields": ["V"]}, read={"column": "Value"}, backend="ddb")))
    assert_problem(err, "routes[0].write.fields", "written to 'V' but read from 'Value'")
    config_from_dict(with_routes(string_route({}, read={"column": "Value"}, backend="ddb")))


def test_versions_table_is_an_identifier_and_can_be_turned_off():
    err = error_of({"backends": {"main": {**PG, "versions_table": "x; DROP TABLE y"}}})
    assert_problem(err, "backends.main.versions_table", "not a plain SQL identifier")
    assert config_from_dict({"backends": {"main": PG}}).backends["main"].versions_table == "cacheproxy_versions"
    assert config_from_dict({"backends": {"main": {**PG, "versions_table": ""}}}).backends["main"].versions_table \
        is None
    assert config_from_dict({"backends": {"main": {**PG, "versions_table": "s.v"}}}).backends["main"].versions_table \
        == "s.v"


def test_max_attempts_is_still_accepted():
    assert config_from_dict({"write_behind": {"max_attempts": 3}}).write_behind.max_attempts == 3
