"""Run configs from the command line: one dataclass per stage is the single source of every default.

``parse_config(Cls, argv)`` turns each field into a flag whose --help is the field's comment (wrapped
continuation comment lines included). A field whose type is itself a dataclass (e.g. pretraining's
``pretext: PretextConfig``) gets one flag per sub-field, ``--pretext.variant``, and a nested object in JSON.
Precedence: dataclass default < preset < --config JSON file < flags; argparse parses every form
(``--config FILE``, ``--config=FILE``, ``--flag=value``), so nothing re-reads argv by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")
CONFIG_FILE_ATTR = "config_file"  # parse_config records the --config file here (an attribute, not a field)

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#\n]*?(?:#\s*(.*))?$")
_CONTINUATION = re.compile(r"^\s+#\s?(.*)$")


def field_comments(cls: type) -> dict[str, str]:
    """The comment after each field of a dataclass, joined with the comment-only lines that follow it."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # base classes first, so a subclass may re-document a field
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        names = {f.name for f in dataclasses.fields(klass)}
        current = None
        for line in lines:
            field = _FIELD.match(line)
            if field and field.group(1) in names:
                current = field.group(1)
                comments[current] = (field.group(2) or "").strip()
                continue
            more = _CONTINUATION.match(line)
            if more and current is not None:
                comments[current] = f"{comments[current]} {more.group(1).strip()}".strip()
            else:
                current = None
    return comments


def _unwrap_optional(kind: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    is_union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else kind


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _add_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        kind = _unwrap_optional(hints[f.name])
        name = prefix + f.name
        if dataclasses.is_dataclass(kind):
            _add_flags(parser, kind, prefix=f"{name}.")
            continue
        help_text = f"{comments.get(f.name, '')} (default: {_default(f)})".replace("%", "%%")  # argparse formats help
        kw: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "dest": name}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) in (tuple, list):
            # tuple[str, ...] may be empty (a bare flag); a fixed-length tuple needs exactly its values
            args = typing.get_args(kind)
            kw.update(nargs="*" if Ellipsis in args else len(args), type=args[0], metavar=f.name.upper())
        else:
            kw["type"] = kind
        parser.add_argument(f"--{name}", **kw)


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict update: nested objects are merged field by field."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _describe(kind: Any) -> str:
    """How a field's annotated type reads in an error message."""
    optional = type(None) in typing.get_args(kind) and typing.get_origin(kind) in (typing.Union, types.UnionType)
    kind = _unwrap_optional(kind)
    if kind is bool:
        text = "true or false (a JSON boolean, not a string)"
    elif kind is int:
        text = "an integer"
    elif kind is float:
        text = "a number"
    elif kind is str:
        text = "a string"
    elif typing.get_origin(kind) in (tuple, list):
        args = typing.get_args(kind)
        element = _describe(args[0]).split(" (")[0].replace("an ", "").replace("a ", "")
        text = f"a list of {element}s" if Ellipsis in args or typing.get_origin(kind) is list else f"a list of {len(args)} {element}s"
    elif dataclasses.is_dataclass(kind):
        text = f"an object with fields of {kind.__name__}"
    else:
        text = getattr(kind, "__name__", str(kind))
    return f"{text} or null" if optional else text


def _check_value(kind: Any, value: Any) -> tuple[bool, Any]:
    """(whether ``value`` fits the annotated type ``kind``, the value to use). JSON has no tuples and no
    difference between 1 and 1.0 for a float field, so lists become tuples and ints become floats; nothing else
    is converted: "false" is not a bool and "2" is not an int."""
    if type(None) in typing.get_args(kind) and typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None:
            return True, None
        kind = _unwrap_optional(kind)
    if kind is Any:
        return True, value
    if kind is bool:
        return isinstance(value, bool), value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if kind is str:
        return isinstance(value, str), value
    if typing.get_origin(kind) in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(kind)
        if typing.get_origin(kind) is list or Ellipsis in args:
            kinds = [args[0] if args else Any] * len(value)
        elif len(value) != len(args):
            return False, value
        else:
            kinds = list(args)
        out = []
        for k, v in zip(kinds, value):
            ok, v = _check_value(k, v)
            if not ok:
                return False, value
            out.append(v)
        return True, tuple(out) if typing.get_origin(kind) is tuple else out
    if isinstance(kind, type) and not dataclasses.is_dataclass(kind):
        return isinstance(value, kind), value
    return True, value  # an annotation this checker does not know: left to the dataclass


def build_config(cls: type[C], values: Mapping[str, Any], source: str = "config", _prefix: str = "") -> C:
    """``cls(**values)`` with nested dataclasses built from dicts, lists turned into tuples where the field is a
    tuple, unknown names refused with the path of the field and the names expected, and every value checked
    against the field's annotated type: ``SOURCE: FIELD must be EXPECTED, got VALUE`` (a JSON string "false"
    would otherwise be a true bool, "1e-3" a str learning rate)."""
    if not isinstance(values, Mapping):
        where = f"{_prefix[:-1]} must be" if _prefix else "expected"
        raise ValueError(f"{source}: {where} a JSON object with fields of {cls.__name__}, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {[_prefix + u for u in unknown]}; expected some of {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        kind = _unwrap_optional(hints[name])
        if dataclasses.is_dataclass(kind) and not (value is None and kind is not hints[name]):
            if isinstance(value, kind):
                kwargs[name] = value
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"{source}: {_prefix}{name} must be {_describe(hints[name])}, got {json.dumps(value, default=str)}")
            kwargs[name] = build_config(kind, value, source, _prefix=f"{_prefix}{name}.")
            continue
        args = typing.get_args(kind)
        if typing.get_origin(kind) is tuple and isinstance(value, (list, tuple)) and Ellipsis not in args and len(value) != len(args):
            raise ValueError(f"{source}: {_prefix}{name} needs {len(args)} values, got {list(value)}")
        ok, checked = _check_value(hints[name], value)
        if not ok:
            raise ValueError(
                f"{source}: {_prefix}{name} must be {_describe(hints[name])}, got {json.dumps(value, default=str)}"
            )
        kwargs[name] = checked
    return cls(**kwargs)


def parse_config(
    cls: type[C],
    argv: list[str] | None = None,
    description: str | None = None,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
) -> C:
    """Build a run-config dataclass from ``--config file.json`` and command-line flags.

    Every field becomes ``--field`` (booleans also get ``--no-field``) with the field's comment as help.
    With ``presets``, the field ``preset`` (given as a flag or in the JSON file) picks a named set of values
    that sits between the dataclass defaults and the JSON file: only what the user did not set comes from it.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="JSON file with any of the fields below; flags override it")
    _add_flags(parser, cls)
    flags = vars(parser.parse_args(argv))
    config_file = flags.pop("config", None)
    file_values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise ValueError(f"--config {config_file}: file not found")
        try:
            file_values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {config_file}: not valid JSON ({e})") from None
        if not isinstance(file_values, dict):
            raise ValueError(f"--config {config_file}: expected a JSON object, got {type(file_values).__name__}")
    explicit = _merge(file_values, _nest(flags))
    values: dict[str, Any] = {}
    preset = explicit.get("preset")
    if presets is not None and preset is not None:
        if preset not in presets:
            raise ValueError(f"--preset must be one of {sorted(presets)}, got {preset!r}")
        values = _merge(values, presets[preset])
    values = _merge(values, explicit)
    cfg = build_config(cls, values, source=f"--config {config_file}" if config_file else cls.__name__)
    if config_file:  # not a field (run_config.json stays the settings): the stage checks it lies outside OUTPUT_DIR
        object.__setattr__(cfg, CONFIG_FILE_ATTR, str(Path(config_file).expanduser()))
    return cfg


def tracker_config(config: Any) -> dict[str, Any]:
    """Flatten a dataclass config to the scalar types TensorBoard's hparams accept (nested fields dotted)."""
    out: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for key, value in d.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            else:
                out[prefix + key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)

    walk(dataclasses.asdict(config), "")
    return out


def _positive_ints(value: Any, n: int) -> bool:
    return len(value) == n and all(int(x) == x and x >= 1 for x in value)


def check_run_config(cfg: Any) -> None:
    """Refuse values of the shared run fields that would train wrongly instead of failing (both stages call it)."""
    rules = {
        "max_steps": (lambda v: v >= 1, "must be >= 1"),
        "batch_size": (lambda v: v >= 1, "must be >= 1"),
        "grad_accum": (lambda v: v >= 1, "must be >= 1"),
        "grad_clip": (lambda v: v >= 0, "must be >= 0 (0 = no clipping)"),
        "lr": (lambda v: v > 0, "must be > 0"),
        "warmup_steps": (lambda v: v >= 0, "must be >= 0"),
        "checkpoint_every": (lambda v: v >= 0, "must be >= 0 (0 = only at the end)"),
        "export_every": (lambda v: v >= 0, "must be >= 0 (0 = only at the end)"),  # -1 exported after every step
        "seed": (lambda v: 0 <= v < 2**32, "must be in 0 .. 2**32 - 1"),  # else Accelerate's set_seed fails unnamed
        "num_workers": (lambda v: v >= 0, "must be >= 0"),
        "weight_decay": (lambda v: v >= 0, "must be >= 0 (a negative decay grows the weights)"),
        "log_every": (lambda v: v >= 1, "must be >= 1"),
        "mixed_precision": (lambda v: v in ("no", "bf16", "fp16", "fp8"), "must be one of no, bf16, fp16, fp8"),
        "patch_size": (lambda v: _positive_ints(v, 3), "must be 3 positive integers (voxels)"),
        "spacing": (lambda v: len(v) == 3 and all(float(x) > 0 for x in v), "must be 3 positive numbers (mm)"),
        "hu_window": (lambda v: len(v) == 2 and float(v[0]) < float(v[1]), "must be LOW HIGH with LOW < HIGH (HU)"),
    }
    for name, (ok, expected) in rules.items():
        value = getattr(cfg, name, None)
        if value is not None and not ok(value):
            raise ValueError(f"--{name} {expected}, got {value}")
    if getattr(cfg, "resume", False) and getattr(cfg, "overwrite", False):
        raise ValueError("--resume continues the run in OUTPUT_DIR and --overwrite deletes it: pass one of them")
