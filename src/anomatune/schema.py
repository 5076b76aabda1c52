"""Settings: each setting's default, validation, YAML form and command-line option, written once.

A group of settings is a frozen dataclass deriving from :class:`Settings`, its fields
made with :func:`setting`. Building one, from Python, from YAML (:meth:`Settings.from_dict`)
or from command-line strings, coerces every value to the field's type and validates it,
so a bad value is refused before any work starts, in one line naming the setting and
what it accepts. :meth:`Settings.to_dict` is the YAML form; :func:`flat_settings` lists the
fields as flat options, which ``anomatune.apps.options`` turns into command-line options
and :meth:`Settings.updated` accepts as keyword arguments. Torch-free, so that
``anomatune --help`` stays fast.
"""

from __future__ import annotations

import math
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from typing import Any, ClassVar

from .errors import SettingsError

TRUE, FALSE, NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("", "none", "null")


@dataclass(frozen=True)
class Interval:
    """Where a number must lie, written as in mathematics: ``[0, 1)``, ``(0, inf)``."""

    text: str

    def __post_init__(self) -> None:
        low, high = self.bounds()  # a malformed interval is a bug: fail at import, not at use
        assert low <= high, self.text

    def bounds(self) -> tuple[float, float]:
        low, high = self.text[1:-1].split(",")
        return float(low), float(high)

    def __contains__(self, value: float) -> bool:
        low, high = self.bounds()
        above = value > low if self.text[0] == "(" else value >= low
        below = value < high if self.text[-1] == ")" else value <= high
        return above and below

    def __str__(self) -> str:
        return self.text


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    choices=None,
    interval: str | None = None,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    parse: Callable[[Any], Any] | None = None,
    metavar: str | None = None,
):
    """A settings field: its default, its help, and what it accepts.

    ``choices``: the allowed values; ``interval``: the range of a number, e.g. ``"[0, 1)"``;
    ``flag``: the command-line name when it is not the field's (``--`` + name with dashes);
    ``aliases``: more command-line names; ``parse``: a function that turns the raw value
    into the field's value (raising ``ValueError`` with what it expected); ``metavar``:
    the value's name in ``--help`` (e.g. ``DIR``).
    """
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "interval": Interval(interval) if interval else None,
        "flag": flag,
        "aliases": tuple(aliases),
        "parse": parse,
        "metavar": metavar,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _is_optional(kind) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


def _without_none(kind):
    """``X`` of ``X | None`` (anything else as it is)."""
    if not _is_optional(kind):
        return kind
    rest = [a for a in typing.get_args(kind) if a is not type(None)]
    return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]


def coerce(value: Any, kind) -> Any:
    """``value`` as an instance of the annotation ``kind``, or ``ValueError`` saying what was expected."""
    if _is_optional(kind):
        if value is None or (isinstance(value, str) and value.strip().lower() in NONE):
            return None
        kind = _without_none(kind)
    if value is None:
        raise ValueError("a value is required, got none")
    if isinstance(kind, type) and issubclass(kind, Settings):
        return kind.coerce(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError(f"expected a whole number, got {value!r}")
    if kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None:
            raise ValueError(f"expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if kind is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise ValueError(f"expected text, got {value!r}")
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if isinstance(value, (str, os.PathLike)):
            value = [os.fspath(value)] if item is str else [v for v in str(value).split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return tuple(coerce(v, item) for v in value)
        raise ValueError(f"expected a list, got {value!r}")
    raise TypeError(f"settings of type {kind} are not supported")  # a bug in a settings class, not the user's fault


@cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclass(frozen=True)
class Settings:
    """Base of every settings group: coerced and validated on construction, immutable.

    Subclasses set ``section`` (their key in YAML and in messages) and may override
    :meth:`check` for rules that involve several fields. ``flag_prefix`` is put before
    their fields' command-line names where a plain name would be ambiguous.
    """

    section: ClassVar[str] = ""
    flag_prefix: ClassVar[str] = ""
    polymorphic: ClassVar[bool] = False  # a group whose class is chosen by a name (the detectors)

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            where = self.where(f.name)
            try:
                raw = getattr(self, f.name)
                value = (
                    f.metadata["parse"](raw)
                    if f.metadata.get("parse") and raw is not None
                    else coerce(raw, _hints(type(self))[f.name])
                )
            except SettingsError as exc:  # a nested group names its own settings
                problems.append(str(exc))
                continue
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
                continue
            object.__setattr__(self, f.name, value)
            choices, interval = f.metadata.get("choices"), f.metadata.get("interval")
            if value is not None and choices and value not in choices:
                problems.append(f"{where}: must be one of {', '.join(map(str, choices))}, not {value!r}")
            elif value is not None and interval and value not in interval:
                problems.append(f"{where}: must be in {interval}, not {value!r}")
        if not problems:
            problems = [f"{self.section + ': ' if self.section else ''}{p}" for p in self.check()]
        if problems:
            raise SettingsError("; ".join(problems))

    def check(self) -> list[str]:
        """Problems that involve several fields (each already has its own type and range)."""
        return []

    @classmethod
    def where(cls, name: str) -> str:
        return f"{cls.section}.{name}" if cls.section else name

    # -- YAML ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The YAML form: plain dicts, lists and scalars."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None, complete: bool = False):
        """Build from a mapping, refusing unknown keys (and, with ``complete``, missing ones).

        ``source`` (a file name) starts every message; ``complete`` is for files that
        anomatune wrote itself, where a missing key means the file is damaged or older.
        """
        prefix = f"{source}: " if source else ""
        try:
            if complete:
                missing = cls.missing_keys(data)
                if missing:
                    raise SettingsError(f"missing {', '.join(missing)}: the file is incomplete or from another version")
            return cls.coerce(data)
        except SettingsError as exc:
            raise SettingsError(prefix + str(exc)) from None

    @classmethod
    def coerce(cls, value: Any):
        """An instance from an instance or a mapping of its fields."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a mapping of {cls.section or 'settings'}, got {value!r}")
        known = [f.name for f in fields(cls)]
        unknown = [str(k) for k in value if k not in known]
        if unknown:
            raise SettingsError(f"unknown setting {', '.join(cls.where(k) for k in unknown)}: choose from {', '.join(known)}")
        return cls(**value)

    @classmethod
    def missing_keys(cls, data: Any) -> list[str]:
        if not isinstance(data, Mapping):
            return []
        missing = []
        for f in fields(cls):
            kind = _without_none(_hints(cls)[f.name])
            if f.name not in data:
                missing.append(cls.where(f.name))
            elif isinstance(kind, type) and issubclass(kind, Settings):
                missing += kind.resolve(data[f.name]).missing_keys(data[f.name])
        return missing

    @classmethod
    def resolve(cls, value: Any) -> type[Settings]:
        """The class that ``value`` describes (a polymorphic group chooses it by name)."""
        return cls

    # -- flat options ----------------------------------------------------------------------

    def updated(self, **changes: Any):
        """A copy with settings changed by their flat names (those of :func:`flat_settings`); itself without changes."""
        if not changes:
            return self
        paths = {flat.key: flat.path for flat in flat_settings(type(self), self)}
        data = self.to_dict()
        for key, value in changes.items():
            if key not in paths:
                raise SettingsError(f"unknown setting {key!r}: choose from {', '.join(paths)}")
            *parents, name = paths[key]
            target = data
            for parent in parents:
                target = target[parent]
            target[name] = _plain(value)
        return type(self).from_dict(data)


def _plain(value: Any) -> Any:
    if isinstance(value, Settings):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class FlatSetting:
    """One setting as a flat option: its keyword (``image_size``), flag (``image-size``) and path."""

    key: str
    flag: str
    aliases: tuple[str, ...]
    path: tuple[str, ...]
    kind: Any
    default: Any
    help: str
    choices: tuple | None
    interval: Interval | None
    metavar: str | None


def flat_settings(cls: type[Settings], defaults: Settings | None = None, path: tuple[str, ...] = ()) -> Iterator[FlatSetting]:
    """Every setting of ``cls`` and its nested groups, with the defaults of ``defaults`` (or ``cls()``).

    A polymorphic group (the detector) is one setting: it is chosen by name. Flat names
    must be unique across groups; a clash is a bug in the settings classes.
    """
    defaults = cls() if defaults is None else defaults
    seen: set[str] = set()
    for f in fields(cls):
        kind = _hints(cls)[f.name]
        value = getattr(defaults, f.name)
        inner = _without_none(kind)
        if isinstance(inner, type) and issubclass(inner, Settings) and not inner.polymorphic:
            children = list(flat_settings(inner, value, path + (f.name,)))
        else:
            flag = f.metadata.get("flag") or cls.flag_prefix + f.name.replace("_", "-")
            children = [
                FlatSetting(
                    flag.replace("-", "_"),
                    flag,
                    f.metadata.get("aliases", ()),
                    path + (f.name,),
                    kind,
                    value,
                    f.metadata.get("help", ""),
                    f.metadata.get("choices"),
                    f.metadata.get("interval"),
                    f.metadata.get("metavar"),
                )
            ]
        for flat in children:
            assert flat.key not in seen, f"two settings are both called {flat.key!r}"
            seen.add(flat.key)
            yield flat
