"""YAML file + ``--set`` overrides -> one validated :class:`Config`.

Every failure raises :class:`ConfigError` with the dotted key, what was
given and what is allowed, so the CLI can print one message and exit 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.config.schema import Config
from orchestrator.errors import ConfigError


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Load ``path`` (or the defaults when None), apply ``KEY=VALUE`` overrides, validate."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        _assign(raw, key, value)
    return validate_config(raw)


def validate_config(raw: Mapping[str, Any]) -> Config:
    """Validate a plain mapping into a :class:`Config`, or raise :class:`ConfigError`."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``dotted.key=value``; the value is read as YAML so numbers and null work."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.steps=300")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot read value {text!r}: {exc}") from None
    return key, value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; see cluster_configs/ for examples") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); is it the YAML file?") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must be a mapping of sections (cluster:, train:, ...), "
            f"not a {type(data).__name__}"
        )
    return data


def _assign(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {dotted}: {where} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe(exc: ValidationError) -> str:
    lines = [_describe_one(err) for err in exc.errors()]
    head = "invalid config" if len(lines) == 1 else f"invalid config ({len(lines)} problems)"
    return head + ":\n  " + "\n  ".join(lines)


def _describe_one(err: Mapping[str, Any]) -> str:
    loc = tuple(str(part) for part in err["loc"])
    key = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    message = err["msg"]
    if kind == "value_error":
        # Our own validators already name the key when it is not the field itself.
        message = message.removeprefix("Value error, ")
        if message.split(":")[0] in _all_keys():
            return message
    if not key:
        return message
    given = err.get("input")
    shown = "" if kind == "missing" or isinstance(given, (dict, list)) else f" (got {given!r})"
    return f"{key}: {message}{shown}"


def _unknown_key(loc: tuple[str, ...]) -> str:
    parent, name = loc[:-1], loc[-1]
    known = sorted(_fields_at(parent))
    where = ".".join(parent) or "the top level"
    guess = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {'.'.join(parent + (guess[0],))}? " if guess else ""
    return f"{'.'.join(loc)}: unknown key; {hint}keys allowed under {where}: {', '.join(known)}"


def _fields_at(path: tuple[str, ...]) -> Iterable[str]:
    model: type[BaseModel] = Config
    for part in path:
        annotation = model.model_fields[part].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel), path
        model = annotation
    return model.model_fields


def _all_keys() -> set[str]:
    keys = set()
    for section, field in Config.model_fields.items():
        for name in field.annotation.model_fields:  # type: ignore[union-attr]
            keys.add(f"{section}.{name}")
    return keys
