"""Typed configs for the ``lorapro`` commands: YAML file + ``key=value`` overrides.

Every command (``train``, ``eval``) describes its settings as a tree of dataclasses. Each field carries its
documentation in ``metadata={"help": ...}``; :func:`help_text` turns that into ``--help``. Loading is strict:
an unknown key is an error that names the closest valid key, and values are converted to the field's type so
``lr=2e-5`` on the command line and ``lr: 2e-5`` in YAML mean the same thing.

This module needs only the standard library plus PyYAML (imported lazily, in :func:`load_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "field",
    "load_config",
    "from_dict",
    "to_dict",
    "help_text",
    "parse_overrides",
    "unknown_key_message",
]


class ConfigError(ValueError):
    """A config file or override is wrong; the message says which key and what to do."""


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation (shown by ``--help``)."""
    kwargs: Dict[str, Any] = {"metadata": {"help": help}}
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


class _UnknownKey(ConfigError):
    """Raised deep inside :func:`from_dict`; the outermost call turns it into the message (it knows the root)."""

    def __init__(self, key: str):
        super().__init__(f"Unknown config key '{key}'.")
        self.key = key


def _dotted_keys(cls: Type[Any], prefix: str = "") -> List[str]:
    out: List[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            out.extend(_dotted_keys(tp, prefix + f.name + "."))
    return out


def unknown_key_message(root: Type[Any], key: str) -> str:
    """``Unknown config key 'KEY'.`` plus the key that was probably meant, always written in full (with its section).

    In order: a foreign name the config class lists in its ``KEY_ALIASES`` (a mapping name -> ``"our.key"`` or
    ``"our.key (note)"``, e.g. Hugging Face ``learning_rate`` -> ``optim.lr``), the same name in another section (``train.lr`` -> ``optim.lr``), the closest name in the same
    section (``optim.lrr`` -> ``optim.lr``); else the keys of that section.
    """
    parts = key.split(".")
    leaf, section = parts[-1], ".".join(parts[:-1])
    all_keys = _dotted_keys(root)
    aliases: Mapping[str, str] = getattr(root, "KEY_ALIASES", {})
    msg = f"Unknown config key '{key}'."
    if leaf in aliases:
        target, _, note = aliases[leaf].partition(" ")
        note = "; " + note[1:-1] if note.startswith("(") else ""
        return msg + f" Did you mean '{target}'? ('{leaf}' is a Hugging Face / LLaMA-Factory name{note}.)"
    elsewhere = [k for k in all_keys if k.split(".")[-1] == leaf and k != key]
    if elsewhere:
        return msg + f" Did you mean '{elsewhere[0]}'?"
    siblings = [k for k in all_keys if ("." in k and k.rsplit(".", 1)[0] == section) or (not section and "." not in k)]
    names = [k.split(".")[-1] for k in siblings]
    match = difflib.get_close_matches(leaf, names, n=1, cutoff=0.5)
    if match:
        return msg + f" Did you mean '{(section + '.' if section else '') + match[0]}'?"
    return msg + f" Valid keys{' of ' + section if section else ''}: {', '.join(sorted(siblings))}."


def _strip_optional(tp: Any) -> Tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is getattr(types, "UnionType")):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the annotated type ``tp``."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none", "~")):
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where}: null is not allowed here; give a value of type {getattr(tp, '__name__', tp)}.")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of sub-keys, got {value!r}.")
        return from_dict(tp, value, prefix=where + ".")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            # allow numbers given as strings on the command line
            for c in choices:
                if str(c) == str(value):
                    return c
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}.")
        return value
    if origin in (list, List, tuple, Tuple, Sequence):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin in (tuple, Tuple) else items
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}.")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}.") from None
        if not f.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}.")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}.") from None
    if tp is str:
        return str(value)
    return value


def _fields(cls: Type[Any]) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def from_dict(cls: Type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, rejecting unknown keys with a suggestion."""
    if not prefix:  # the root: unknown keys anywhere below are reported here, where every section is known
        try:
            return _from_dict(cls, data, prefix)
        except _UnknownKey as e:
            raise ConfigError(unknown_key_message(cls, e.key)) from None
    return _from_dict(cls, data, prefix)


def _from_dict(cls: Type[T], data: Mapping[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs: Dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise _UnknownKey(f"{prefix}{key}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"Missing required config key(s): {', '.join(prefix + m for m in missing)}.")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """A plain (YAML/JSON-serialisable) dict of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_overrides(cls: Type[Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Turn ``["optim.lr=1e-4", "method=lora"]`` into a nested dict, checking every key against ``cls``."""
    out: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form key=value (for example: training.lr=1e-4).")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        # Walk the dataclass tree to check every component now, with a helpful message.
        node_cls: Any = cls
        for depth, part in enumerate(parts):
            fields = _fields(node_cls)
            if part not in fields:
                raise ConfigError(unknown_key_message(cls, ".".join(parts[: depth + 1])))
            hint, _ = _strip_optional(typing.get_type_hints(node_cls)[part])
            if depth < len(parts) - 1:
                if not dataclasses.is_dataclass(hint):
                    raise ConfigError(f"'{'.'.join(parts[: depth + 1])}' has no sub-keys; use {'.'.join(parts[: depth + 1])}=VALUE.")
                node_cls = hint
        cursor = out
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        # A str-typed key takes the text as is: YAML would turn "Q: {question}" into a mapping.
        cursor[parts[-1]] = raw if hint is str else _parse_scalar(raw)
    return out


def _parse_scalar(raw: str) -> Any:
    """Command-line values are YAML scalars: ``1e-4``, ``true``, ``[q_proj, v_proj]``, ``null``."""
    try:
        import yaml

        return yaml.safe_load(raw) if raw != "" else ""
    except Exception:
        return raw


def _deep_merge(base: Dict[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def load_config(cls: Type[T], path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> T:
    """Read ``path`` (YAML) into ``cls``, then apply ``key=value`` overrides. Errors are :class:`ConfigError`."""
    data: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file '{p}' does not exist. Pass the path of a YAML file (see configs/).")
        import yaml

        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file '{p}' is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"Config file '{p}' must hold a mapping of keys at the top level.")
        data = loaded
    _deep_merge(data, parse_overrides(cls, overrides))
    return from_dict(cls, data)


def help_text(cls: Type[Any], prefix: str = "", indent: int = 2) -> str:
    """One line per key (dotted for nested configs) with type, default and documentation."""
    lines: List[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints[f.name])
        name = prefix + f.name
        doc = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            lines.append(" " * indent + f"{name}:  {doc}")
            lines.append(help_text(tp, prefix=name + ".", indent=indent + 2))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        lines.append(" " * indent + f"{name} ({tname}, default {default!r}): {doc}")
    return "\n".join(lines)
