"""Where a config comes from: YAML (line numbers on syntax errors, duplicate keys refused), ${VAR}
expansion, CACHEPROXY_<SECTION>__<FIELD> overrides; then validation, cross-field checks, defaults."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from .checks import check_config, fill_defaults
from .problems import ConfigError, Problem, dotted, problem_from_pydantic, resolve
from .schema import ENV_PREFIX, Config

# ------------------------------------------------------------------------------- environment values

_VAR = re.compile(r"\$(\$?)\{([^}]*)\}")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _expand_env(data: Any, env: Mapping[str, str], loc: list, problems: list, origins: dict) -> Any:
    """${VAR} and ${VAR:-default} in every string value (keys are left alone)."""
    if isinstance(data, dict):
        return {k: _expand_env(v, env, loc + [k], problems, origins) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_env(v, env, loc + [i], problems, origins) for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data
    path = dotted(resolve(loc).path) if loc else "(top level)"
    used = []

    def substitute(m: re.Match) -> str:
        if m.group(1):                       # $${X} is the literal text ${X}
            return m.group(0)[1:]
        name, has_default, default = m.group(2).partition(":-")
        if not _VAR_NAME.match(name):
            problems.append(Problem(path, f"bad variable reference {m.group(0)!r}",
                                    "write ${NAME} or ${NAME:-default} (use $${...} for a literal ${)"))
            return ""
        value = env.get(name)
        used.append(name)
        if value is None or (has_default and value == ""):
            if has_default:
                return default
            problems.append(Problem(path, f"environment variable {name} is not set",
                                    f"export {name}, or write ${{{name}:-default}} to give a default"))
            return ""
        return value

    result = _VAR.sub(substitute, data)
    if used:
        origins.setdefault(path, "value from " + ", ".join(f"${{{n}}}" for n in used))
    return result


def _override_value(loc: Sequence[str | int], raw: str) -> Any:
    """Parse an override as a YAML scalar (or flow list), except for string fields: those keep the text."""
    if resolve(loc).type is str:
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) else value


def _apply_overrides(data: dict, env: Mapping[str, str], problems: list, origins: dict) -> None:
    """CACHEPROXY_<SECTION>__<FIELD>[__<FIELD>...]=value; names without '__' (CACHEPROXY_CONFIG) are not overrides."""
    for name in sorted(env):
        rest = name[len(ENV_PREFIX):]
        if not name.startswith(ENV_PREFIX) or "__" not in rest:
            continue
        segments: list[str | int] = [int(s) if s.isdigit() else s for s in rest.lower().split("__")]
        if "" in segments:
            problems.append(Problem("", f"environment variable {name} has an empty path segment",
                                    "write CACHEPROXY_<SECTION>__<FIELD>, e.g. CACHEPROXY_LISTEN__PORT"))
            continue
        path = dotted(resolve(segments).path)
        error = _set_path(data, segments, _override_value(segments, env[name]))
        if error:
            problems.append(Problem(path, f"cannot apply {name}: {error}",
                                    "fix the variable name, or the value it descends into in the file"))
        else:
            origins[path] = f"set by {name}"


def _set_path(data: dict, segments: Sequence[str | int], value: Any) -> str | None:
    node: Any = data
    for depth, seg in enumerate(segments):
        last = depth == len(segments) - 1
        if isinstance(node, list):
            if not isinstance(seg, int) or seg >= len(node):
                return f"{dotted(segments[:depth]) or 'the file'} has no item {seg}"
        elif isinstance(node, dict):
            seg = str(seg)                   # mapping keys are names, even when they look like numbers
            if not last and node.get(seg) is None:
                node[seg] = {}               # create (or fill an empty `section:`) on the way down
            elif not last and not isinstance(node[seg], dict | list):
                return f"{dotted(segments[:depth + 1])} is not a mapping"
        else:
            return f"{dotted(segments[:depth])} is not a mapping"
        if last:
            node[seg] = value
        else:
            node = node[seg]
    return None


# ------------------------------------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML would silently keep the last one)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark.line)
        except TypeError:
            continue                         # unhashable key: SafeLoader reports it below
        if first != key_node.start_mark.line:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given on line {first + 1})", key_node.start_mark)
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path, source: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(source, "", "file not found", "check the path (relative paths start at the current directory)") from None
    except IsADirectoryError:
        raise _fail(source, "", "is a directory, not a file", "give the path of a YAML file") from None
    except UnicodeDecodeError as exc:
        raise _fail(source, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})", "save the file as UTF-8") from None
    except OSError as exc:
        raise _fail(source, "", f"cannot read the file: {exc.strerror or exc}", "check the file's permissions") from None
    try:
        return yaml.load(text, Loader=_Loader)   # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(filter(None, (exc.context, exc.problem)))
        raise _fail(source, where, f"YAML syntax error: {what}",
                    "check indentation, quoting and brackets near that line") from None
    except yaml.YAMLError as exc:
        raise _fail(source, "", f"YAML syntax error: {exc}", "check the file is valid YAML") from None


def _fail(source: str, where: str, message: str, fix: str) -> ConfigError:
    return ConfigError.from_problems(source, [Problem(where, message, fix)])


# --------------------------------------------------------------------------------------- public API

def config_from_dict(data: Mapping[str, Any] | None, source: str = "<dict>", *,
                     env: Mapping[str, str] | None = None) -> Config:
    """Validate a config given as plain data. With `env`, ${VAR} and CACHEPROXY_ overrides apply too
    (load_config passes os.environ; tests that build configs in code usually pass nothing)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _fail(source, "", f"the top level must be a mapping of sections (got {type(data).__name__})",
                    "start the file with sections such as `listen:` and `upstream:`")
    data = dict(data)      # a plain dict from here on: overrides write into it
    origins: dict[str, str] = {}
    if env is not None:
        problems: list[Problem] = []
        data = dict(_expand_env(data, env, [], problems, origins))
        _apply_overrides(data, env, problems, origins)
        if problems:
            raise ConfigError.from_problems(source, problems, origins)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError.from_problems(source, [problem_from_pydantic(e) for e in exc.errors()], origins) from None
    problems = check_config(cfg)
    if problems:
        raise ConfigError.from_problems(source, problems, origins)
    fill_defaults(cfg)
    return cfg


def load_config(path: str | os.PathLike, env: Mapping[str, str] | None = None) -> Config:
    """Read, expand, override and validate a YAML config file (env defaults to os.environ)."""
    source = os.fspath(path)
    data = _read_yaml(Path(source), source)
    return config_from_dict(data, source, env=os.environ if env is None else env)


