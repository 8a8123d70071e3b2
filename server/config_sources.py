"""Where each ``mfserve serve`` setting comes from: flag > environment > TOML file > default.

Every option of the ``serve`` parser (the flags generated from ``ServerConfig`` and the CLI's own,
``--model`` and ``--log-level`` included) has one key, its long flag without the dashes in
snake_case (``--max-k`` -> ``max_k``, ``--max-message-mb`` -> ``max_message_mb``), and takes what
the flag takes, in the flag's units. The key names its environment variable (``MFSERVE_MAX_K``) and
its entry in the ``--config`` file (``max_k = 500``, at the top level or in a ``[serve]`` table).
Keys are derived from the parser rather than listed, so a field added to ``ServerConfig`` gets its
variable and file key with no change here.

The parser's defaults are ``argparse.SUPPRESS`` (``defer_defaults``), so a flag that was given is
one present in the namespace, and a default can never hide a variable or a file entry.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mfserve.server.config import ConfigError, ServerConfig, config_from_args

ENV_PREFIX = "MFSERVE_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"  # the file, when --config is not given
TABLE = "serve"
# The parser's options that are not settings.
NOT_SETTINGS = frozenset({"help", "config", "print_config"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class SourceError(ValueError):
    """A value that cannot be used; the message starts with where it came from."""


@dataclass(frozen=True)
class Option:
    """One setting: its parser action, key, variable and default."""

    action: argparse.Action
    default: Any

    @property
    def flag(self) -> str:
        return next(s for s in self.action.option_strings if s.startswith("--"))

    @property
    def key(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def dest(self) -> str:
        return self.action.dest


@dataclass(frozen=True)
class Setting:
    option: Option
    value: Any
    source: str  # "default", "file PATH key K", "env VAR" or "flag --F"


def defer_defaults(parser: argparse.ArgumentParser) -> None:
    """Move each setting's default off ``parser`` (see the module doc) into the namespace entry
    ``_serve_options``, which ``resolve`` reads; call once every option is added."""
    options = []
    for action in parser._actions:
        if action.dest in NOT_SETTINGS or not action.option_strings:
            continue
        options.append(Option(action, action.default))
        action.default = argparse.SUPPRESS
        action.required = False  # --model may come from the environment or the file
    parser.set_defaults(_serve_options=tuple(options))


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Setting]:
    """Every setting by ``dest``, from the highest source that has it."""
    options: tuple[Option, ...] = args._serve_options
    path = getattr(args, "config", None) or environ.get(CONFIG_ENV) or None
    entries = _read_file(path, options) if path else {}
    settings: dict[str, Setting] = {}
    for option in options:
        if hasattr(args, option.dest):  # parsed and checked by argparse already
            settings[option.dest] = Setting(
                option, getattr(args, option.dest), f"flag {option.flag}"
            )
        elif option.env in environ:
            where = f"env {option.env}"
            value = _convert(option, _env_value(option, environ[option.env], where), where)
            settings[option.dest] = Setting(option, value, where)
        elif option.key in entries:
            written, raw = entries[option.key]
            where = f"file {path} key {written}"
            settings[option.dest] = Setting(option, _convert(option, raw, where), where)
        else:
            settings[option.dest] = Setting(option, option.default, "default")
    return settings


def server_config(settings: Mapping[str, Setting]) -> ServerConfig:
    """The ``ServerConfig`` of resolved settings; a field out of range names its source."""
    values = argparse.Namespace(**{dest: s.value for dest, s in settings.items()})
    try:
        return config_from_args(values)
    except ConfigError as exc:
        setting = settings.get(exc.name)
        where = setting.source if setting is not None else f"field {exc.name}"
        raise SourceError(f"{where}: {exc.value!r} is out of range ({exc.rule})") from None


def _read_file(path: str, options: tuple[Option, ...]) -> dict[str, tuple[str, Any]]:
    """``key -> (key as written, value)`` of a TOML file; unknown keys are errors."""
    # Imported here: the serve flags are registered on the thin client install, where Python 3.10
    # has no tomllib and the [server] extra's tomli backport is not installed.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the [server] extra installs tomli there
        import tomli as tomllib
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise SourceError(f"file {path}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line L, column C)"
        raise SourceError(f"file {path}: not valid TOML: {exc}") from None
    table = data.pop(TABLE, {})
    if not isinstance(table, dict):
        raise SourceError(f"file {path} key {TABLE}: must be a table ([{TABLE}])")
    entries: dict[str, tuple[str, Any]] = {key: (key, value) for key, value in data.items()}
    known = {option.key for option in options}
    for key, value in table.items():
        if key in entries:
            raise SourceError(f"file {path}: key {key} is given twice (top level and [{TABLE}])")
        entries[key] = (f"{TABLE}.{key}", value)
    for key, (written, _) in entries.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SourceError(f"file {path}: unknown key {written}{hint}")
    return entries


def _env_value(option: Option, text: str, where: str) -> Any:
    if option.action.nargs != 0:
        return text
    lowered = text.strip().lower()  # an on/off flag: the variable says which
    if lowered in _TRUE | _FALSE:
        return lowered in _TRUE
    raise SourceError(f"{where}: {text!r} is not one of 1/true/yes/on or 0/false/no/off")


def _convert(option: Option, raw: Any, where: str) -> Any:
    """``raw`` (a TOML value, or a variable's text) as the flag would have parsed it."""
    action = option.action
    if action.nargs == 0:  # store_true: a boolean, never text that merely looks like one
        if not isinstance(raw, bool):
            raise SourceError(f"{where}: {raw!r} is not true or false")
        return raw
    if isinstance(raw, (bool, dict)):
        raise SourceError(f"{where}: {_toml(raw)} is not a value of {option.flag}")
    text = ",".join(map(str, raw)) if isinstance(raw, list) else str(raw)
    try:
        value = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise SourceError(f"{where}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise SourceError(f"{where}: invalid choice {text!r} (choose from {choices})")
    return value


# --------------------------------------------------------------------------- --print-config
def render(settings: Mapping[str, Setting]) -> str:
    """The settings as a TOML file that gives the same config, each line saying its source;
    a value the flag cannot spell (unbounded, off, unset) is a comment."""
    fields = {spec.name: spec for spec in dataclasses.fields(ServerConfig)}
    lines = ["# mfserve serve: resolved settings (flag > env > file > default)"]
    for setting in settings.values():
        value = setting.value
        spec = fields.get(setting.option.dest)
        if spec is not None and spec.metadata.get("flag_value"):
            value = spec.metadata["flag_value"](value)
        key = setting.option.key
        if value is None or value in ("", ()):
            lines.append(f"# {key}: not set  # {setting.source}")
        else:
            lines.append(f"{key} = {_toml(value)}  # {setting.source}")
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return json.dumps(os.fspath(value) if isinstance(value, os.PathLike) else str(value))
