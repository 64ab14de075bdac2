"""Methods by name. Adding a method means adding one module here and one line below.

Each method module defines an options dataclass (fields with defaults, ``seed`` and
``quick`` among them, ``BOUNDS``: the range of each numeric option, and ``scaled()``: the
values under ``quick``) and
``run(bank, options, progress=None) -> MethodResult``, which runs ``options`` as given:
``resolve_options`` scales them, once.
Options resolve as defaults < ``--config FILE.toml`` < explicit keywords/flags.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import numbers
import operator
import tomllib
import types
import typing
from pathlib import Path

import numpy as np

from sanitize.formats.records import InputError, is_flag, too_long

# name -> (module, options class)
REGISTRY: dict[str, tuple[str, str]] = {
    "advrbd": ("sanitize.methods.advrbd", "AdvrbdOptions"),
    "dbd": ("sanitize.methods.dbd", "DbdOptions"),
}


def load(name: str):
    """(module, options class) of method ``name``."""
    if name not in REGISTRY:
        raise InputError(f"unknown method {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    module_name, options_name = REGISTRY[name]
    module = importlib.import_module(module_name)
    return module, getattr(module, options_name)


def resolve_options(name: str, config: str | Path | None = None, **overrides):
    """The method's options: dataclass defaults < the top level, then the ``[<name>]`` table, of a TOML file
    < overrides.

    Unknown keys are a user error, reported with the valid ones. With ``quick`` the
    values come back scaled down, as the method runs them (and the manifest records them),
    except those the file or the overrides set: ``--quick --set warmup_epochs=10`` runs 10.
    """
    _, options_class = load(name)
    values: dict = {}
    if config is not None:
        values.update(_read_config(Path(config), name))
    values.update({key: value for key, value in overrides.items() if value is not None})
    values = checked_values(name, values)
    if "arch" in values:  # every method trains a model of the engine's (the import brings torch)
        from sanitize.models import ARCHS

        if values["arch"] not in ARCHS:
            raise InputError(f"option arch must be one of {', '.join(sorted(ARCHS))}, got {values['arch']!r}")
    return dataclasses.replace(options_class(**values).scaled(), **values)


def checked_values(name: str, values: dict) -> dict:
    """``values`` as method ``name``'s option types, every name and bound checked (InputError otherwise)."""
    _, options_class = load(name)
    check_names(name, values)
    hints = typing.get_type_hints(options_class)
    checked = {}
    for key, value in values.items():
        checked[key] = coerce(f"option {key}", value, _value_type(hints[key]))
        check_bounds(key, checked[key], options_class.BOUNDS.get(key, ()))
    return checked


def check_names(name: str, keys) -> None:
    """An InputError unless every one of ``keys`` is an option of method ``name``; the message lists the valid ones."""
    _, options_class = load(name)
    known = {f.name for f in dataclasses.fields(options_class)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise InputError(f"unknown option(s) for {name}: {', '.join(unknown)}; valid: {', '.join(sorted(known))}")


_COMPARISONS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def check_bounds(key: str, value, bounds: tuple[str, ...]) -> None:
    """An InputError unless ``value`` meets every bound (``"> 0"``, ``"<= 1"``, ...) an options class
    declares for ``key`` in its ``BOUNDS``; the message states them."""
    if value is None:  # decided by the method
        return
    for bound in bounds:
        comparison, _, limit = bound.partition(" ")
        if not _COMPARISONS[comparison](value, float(limit)):
            raise InputError(f"option {key} must be {' and '.join(bounds)}, got {shown(value)}")


def parse_assignments(pairs, flag: str = "--set") -> dict:
    """``KEY=VALUE`` pairs (``--set``) -> {key: value}: ``-`` in a key reads as ``_``; a value is
    true/false in any case, else JSON if it parses (5, 0.6, [1, 2], "a=b"), else the string as
    given. ``coerce`` then checks it against the option's type."""
    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key, text = key.strip().replace("-", "_"), text.strip()
        if not sep or not key:
            raise InputError(f"{flag} expects KEY=VALUE, got {pair!r}")
        if text.lower() in ("true", "false"):
            values[key] = text.lower() == "true"
            continue
        try:
            values[key] = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, a number of over 4,300 digits, nested too deeply:
            values[key] = text  # the string, which ``coerce`` then checks like any other
    return values


def describe(name: str) -> list[dict]:
    """Method ``name``'s options as run by default: [{"name", "type", "range", "default", "quick"}], in
    declaration order; ``type`` lists a Literal's choices, ``range`` the bounds of a number ("" for
    others), ``quick`` is the value under --quick."""
    _, options_class = load(name)
    hints = typing.get_type_hints(options_class)
    defaults, quick = resolve_options(name), resolve_options(name, quick=True)
    rows = []
    for option in dataclasses.fields(options_class):
        kind = _value_type(hints[option.name])
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else ()
        rows.append({"name": option.name, "type": "|".join(choices) or kind.__name__,
                     "range": " and ".join(options_class.BOUNDS.get(option.name, ())),
                     "default": getattr(defaults, option.name), "quick": getattr(quick, option.name)})
    return rows


def _read_config(path: Path, name: str) -> dict:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"config file not found: {path}") from None
    except ValueError as error:  # TOMLDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
        raise InputError(f"config file {path} is not valid TOML: {too_long(error)}") from None
    except RecursionError:
        raise InputError(f"config file {path} is not valid TOML: nested too deeply") from None
    tables = {key for key, value in data.items() if isinstance(value, dict)}
    unknown = sorted(tables - set(REGISTRY))
    if unknown:  # a misspelt [advbrd] would otherwise be ignored, and its options with it
        raise InputError(f"config file {path}: unknown table(s) {', '.join(f'[{t}]' for t in unknown)}; "
                         f"the tables are the methods: {', '.join(f'[{m}]' for m in sorted(REGISTRY))}")
    if name in data and not isinstance(data[name], dict):
        raise InputError(f"config file {path}: [{name}] must be a table")
    for other in sorted(tables - {name}):  # one file serves both methods: a bad value waits for no run
        try:
            checked_values(other, data[other])
        except InputError as error:
            raise InputError(f"config file {path}, table [{other}]: {error}") from None
    # Keys at the top level apply to every method; the method's own table overrides them.
    return {**{key: value for key, value in data.items() if key not in tables}, **data.get(name, {})}


def _value_type(hint) -> type:
    """``bool | None`` -> bool (None means "decided by the method"), ``Literal[...] | None`` -> the
    Literal; a plain type, or a Literal without None, stays (its arguments are its choices, not types)."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    return kinds[0] if kinds else hint


def coerce(what: str, value, kind: type, item_kind: type = int):
    """``value`` (from TOML, JSON or a command line) as ``kind``, or an InputError naming ``what``.

    A Literal takes one of its strings; a bool must already be one (``bool("false")`` is
    True), and nothing else takes a bool; an int must be whole (0.5 must not silently
    become 0) and at most MAX_INT in size; a float must be finite and within float32's range
    (NaN or infinity is never a meaningful setting: it slips past a bound like "> 0" and turns
    the run into NaN); a tuple takes a list, a comma-separated string or one value of
    ``item_kind``. Also used for the attacks' parameters.
    """
    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        if isinstance(value, str) and value in choices:
            return value
        raise InputError(f"{what} must be one of {', '.join(map(repr, choices))}, got {shown(value)}")
    flag = is_flag(value)
    if kind is bool:
        if flag and getattr(value, "ndim", 0) == 0:
            return bool(value)
        raise InputError(f"{what} must be true or false, got {shown(value)}")
    if flag:  # int(True) is 1: a flag is never taken for a number
        raise InputError(f"{what} must be {kind.__name__}, got {shown(value)}")
    if kind is tuple:
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        try:
            return tuple(coerce(what, item.strip() if isinstance(item, str) else item, item_kind)
                         for item in items if str(item).strip())
        except InputError:
            raise InputError(f"{what} must be a list of {item_kind.__name__}, got {shown(value)}") from None
    try:
        converted = _whole(value) if kind is int else kind(value)
    except (TypeError, ValueError, OverflowError):  # int(inf) overflows
        wanted = {int: "a whole number", float: "a finite number"}.get(kind, kind.__name__)
        raise InputError(f"{what} must be {wanted}, got {shown(value)}") from None
    if kind is int and abs(converted) > MAX_INT:
        raise InputError(f"{what} must be a whole number of at most 2**53 in size, got {shown(value)}")
    if kind is float and not (math.isfinite(converted) and abs(converted) <= MAX_FLOAT):
        raise InputError(f"{what} must be a finite number within float32's range, got {shown(value)}")
    return converted


def shown(value, limit: int = 60) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters: a 5,000-digit number or a
    deeply nested list given as an option must not fill the terminal."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# The engine computes in float32: a larger value is infinity there (lr=1e39 overflowed in the optimizer,
# a SIG frequency of 1e39 made black poisons). Integers beyond 2**53 are not exact as floats, and no
# epoch count, batch size or seed needs them (torch took 1e30 for a seed and overflowed).
MAX_FLOAT = float(np.finfo(np.float32).max)
MAX_INT = 2 ** 53


def _whole(value) -> int:
    """``value`` as an int if it is a whole number (7, 7.0, "7", "7.0", "1e3", numpy's and torch's
    integers, as a notebook hands them over); ValueError otherwise."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            value = float(value)
    try:
        return operator.index(value)
    except TypeError:
        pass
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    raise ValueError(value)
