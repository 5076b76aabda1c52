"""Command-line options generated from the settings dataclasses, and settings built back from them.

Every setting of a settings group becomes one option named after it (``image_size`` →
``--image-size``), with its help, its default (shown, never passed: an option that is
not given leaves the setting to ``--config`` or to the default) and its choices or range.
Values arrive as text and are coerced and validated by the settings classes, so the
command line, YAML and Python refuse a bad value with the same one-line message. A
detector (a polymorphic group) is ``--detector NAME`` plus ``--set KEY=VALUE``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from ..errors import SettingsError
from ..models.settings import DetectorSettings
from ..schema import FlatSetting, Settings, flat_settings
from ..validation.settings import AUTO_DETECTOR


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "none"
    if isinstance(value, DetectorSettings):
        return value.name
    return str(value)


def _metavar(flat: FlatSetting) -> str:
    choices = [*DetectorSettings.names(), AUTO_DETECTOR] if isinstance(flat.default, DetectorSettings) else flat.choices
    if choices:
        return "[" + "|".join(map(str, choices)) + "]"
    if flat.metavar:
        return flat.metavar
    text = str(flat.kind)
    for word, metavar in (("tuple[int", "N,N"), ("tuple[float", "X,X"), ("int", "INTEGER"), ("float", "NUMBER")):
        if word in text:
            return metavar
    return "TEXT"


class GroupedOption(click.Option):
    """An option that knows the settings group it belongs to (its heading in ``--help``)."""

    def __init__(self, *args, group: str = "Options", **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group


class GroupedCommand(click.Command):
    """``--help`` lists the options under one heading per settings group (Features, Detector, Threshold, ...), in
    the order the command declares them, then the command's own options."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                groups.setdefault(getattr(param, "group", "Options"), []).append(record)
        for name in [*(g for g in groups if g != "Options"), "Options"]:
            if name in groups:
                with formatter.section(name):
                    formatter.write_dl(groups[name])


def _group(cls: type[Settings], flat: FlatSetting) -> str:
    if isinstance(flat.default, Settings):  # a polymorphic group chosen by name (the detector)
        section = flat.default.section
    else:
        section = flat.path[0] if len(flat.path) > 1 else cls.section or "options"
    return section.replace("_", " ").capitalize()


def _option(flat: FlatSetting, group: str, default: Any = None):
    """The option of one setting; its default (``default`` when the command has its own) is shown (when it has one),
    not passed (an unset option leaves the setting alone)."""
    names = [f"--{flat.flag}", *(f"--{a}" for a in flat.aliases)]
    default = flat.default if default is None else default
    shown = "" if default is None or default == () else f"  [default: {_show(default)}]"
    help_text = flat.help + (f" Range: {flat.interval}." if flat.interval else "") + shown
    common = dict(default=None, help=help_text, show_default=False, cls=GroupedOption, group=group)
    if flat.kind is bool:
        return click.option(f"{names[0]}/--no-{flat.flag}", flat.key, **common)
    multiple = "tuple[str" in str(flat.kind)
    return click.option(*names, flat.key, multiple=multiple, metavar=_metavar(flat), **common)


SET_OPTION = click.option(
    "--set",
    "detector_changes",
    cls=GroupedOption,
    group="Detector",
    multiple=True,
    metavar="KEY=VALUE",
    help="A setting of the detector (or guide), e.g. --set n_components=8 (repeatable; see 'anomatune detectors').",
)


def options(cls: type[Settings], only: Iterable[str] | None = None, defaults: dict[str, Any] | None = None):
    """A decorator adding one option per setting of ``cls`` (those named in ``only``, when given); ``defaults``: the
    command's own default of a setting, as its help shows it (``fit``'s detector is ``auto``)."""
    chosen = [flat for flat in flat_settings(cls) if only is None or flat.key in set(only)]
    defaults = defaults or {}

    def decorate(command):
        for flat in reversed(chosen):  # the last decorator applied is listed first
            if isinstance(flat.default, DetectorSettings):
                command = SET_OPTION(command)
            command = _option(flat, _group(cls, flat), defaults.get(flat.key))(command)
        return command

    return decorate


def parse_pairs(pairs: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` texts as a dict; each value read as YAML (numbers, true/false, lists)."""
    import yaml  # only when settings are built: --help stays fast

    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set expects KEY=VALUE, not {pair!r}")
        try:
            changes[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            changes[key.strip().replace("-", "_")] = value
    return changes


def read_settings_file(path: str | None) -> dict:
    """A YAML settings file: the groups of ``cls`` directly, or a run's config.yaml (its ``settings``)."""
    if path is None:
        return {}
    import yaml  # only with --config

    if Path(path).is_dir():  # a model's folder: its served version's settings
        from ..folders.kinds import RunFolder, open_run

        path = open_run(path) / RunFolder.CONFIG

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"--config {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if isinstance(data, dict) and "run_format" in data and "settings" in data:
        data = data["settings"]
    if not isinstance(data, dict):
        raise SettingsError(f"--config {path}: expected a mapping of settings")
    return data


def build(cls: type[Settings], values: dict[str, Any], config: str | None = None):
    """The settings of ``cls`` from a command's option values (and a ``--config`` file): validated, or one-line errors.

    Settings whose option the command does not have (or that were not given) keep the default or the file's value.
    """
    base = cls()
    file = read_settings_file(config)
    if file:
        merged = base.to_dict()
        _merge(merged, file)
        base = cls.from_dict(merged, source=config)
    changes = {}
    for flat in flat_settings(cls, base):
        value = values.get(flat.key)
        if isinstance(flat.default, DetectorSettings):
            sets = parse_pairs(values.get("detector_changes") or ())
            if value is None and not sets:
                continue
            current = flat.default.to_dict() if value in (None, flat.default.name) else {"name": value}
            value = current | sets
        elif value is None or value == ():
            continue
        changes[flat.key] = value
    return base.updated(**changes)


def _merge(target: dict, update: dict) -> None:
    """Nested update; a detector mapping naming another detector replaces the current one."""
    for key, value in update.items():
        old = target.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value.get("name", old.get("name")) == old.get("name"):
            _merge(old, value)
        else:
            target[key] = value
