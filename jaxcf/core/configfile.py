"""Reading configs: the typed build of a dataclass tree from plain data, YAML files, ``--set`` overrides.

Every value is checked against its annotation: unknown keys fail with the dotted key and a "did you
mean", wrong types with what was expected. YAML is read with ``yaml.safe_load`` only; YAML 1.1's
``1e-3`` (a string there) is accepted as the number it means.

What does not live here: the schema, its defaults and the value checks (``jaxcf.core.config``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import reprlib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxcf.core.errors import ConfigError
from jaxcf.core.fileio import UnsafeFileError, read_regular

# How deep a config value may nest (a config's deepest is two levels: section, key, a short list).
MAX_DEPTH = 16
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def suggest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _known_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks and converts one leaf value to the annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if value is None:
        raise ConfigError(f"{key}: must not be null; expected {_type_name(tp)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, e.g. [0.5, 5.0]; got {shown(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false; got {shown(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer; got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number; got {shown(value)}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads `1e-3` as a string because it lacks a dot; accept it as the
            # number the user meant rather than failing on a technicality.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number; got {shown(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string; got {shown(value)}")
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        where = prefix.rstrip(".") or "the config"
        raise ConfigError(f"{where}: expected a mapping of keys to values; got {shown(raw)}")
    hints = typing.get_type_hints(cls)
    known = _known_keys(cls)
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"unknown config key {prefix}{key!s}{suggest(str(key), known)}; "
                f"allowed keys here: {', '.join(known)}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build(tp, raw[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(raw[f.name], tp, f"{prefix}{f.name}")
    return cls(**kwargs)


# The largest config file read (a config is a few hundred bytes).
MAX_CONFIG_BYTES = 1 << 20


def shown(value: Any) -> str:
    """A value for a message: its repr, shortened (a 5,000-deep list is not printed whole)."""
    return _REPR.repr(value)


def resolve_path(name: str | Path, config_dir: Path) -> Path:
    """A config argument as a file: an existing path, else a config shipped with the package.

    Raises:
      ConfigError: when neither exists, or the path names something that is not a regular file.
    """
    path = Path(name)
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"config file {str(name)!r} is not a regular file (a device, a pipe or a folder); "
                          "give a path to a YAML file")
    for candidate in (config_dir / path.name, config_dir / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.name for p in config_dir.glob("*.yaml")))
    raise ConfigError(f"config file not found: {str(name)!r}; give a path to a YAML file or one of: {shipped}")


def read_yaml(path: Path) -> Any:
    try:
        text = read_regular(path, MAX_CONFIG_BYTES).decode("utf-8")
    except UnsafeFileError as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err} (a config is a small YAML file)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err}") from None
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"config file {str(path)!r} nests too deeply to be a config") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"YAML syntax error in {str(path)!r}{where}: {problem}") from None


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``key.sub=value`` strings; each value is parsed as YAML (so `null`, `[0, 5]` work)."""
    raw = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. optim.learning_rate=3e-3); got {item!r}")
        key, _, text = item.partition("=")
        key = key.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except (yaml.YAMLError, RecursionError):
            raise ConfigError(f"--set {key}: cannot parse value {shown(text)}") from None
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _deep_copy(raw: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise ConfigError(f"a config value nests more than {MAX_DEPTH} levels deep; no config key takes that")
    if isinstance(raw, Mapping):
        return {k: _deep_copy(v, depth + 1) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v, depth + 1) for v in raw]
    return raw


# A number in exponent form without a dot (``1e-5``), which YAML 1.1 reads as text.
EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """``KEY=V1,V2,...`` strings -> ``{key: [values]}``; values are parsed as YAML scalars."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise ConfigError(f"--grid expects KEY=V1,V2,... (e.g. optim.weight_decay=1e-5,1e-4); got {item!r}")
        if key == "seed":
            raise ConfigError("--grid seed=...: use --seeds N (members get seeds seed, seed+1, ...)")
        values = []
        for part in text.split(","):
            try:
                value = yaml.safe_load(part)
            except yaml.YAMLError:
                raise ConfigError(f"--grid {key}: cannot parse value {part!r}") from None
            if isinstance(value, str) and EXPONENT.match(value.strip()):  # YAML 1.1 reads 1e-5 as text
                value = float(value)
            values.append(value)
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; put all its values in one --grid")
        grid[key] = values
    return grid
