"""Where a run's options come from: `.env`, a `--config run.toml` file, the command line, the defaults.

Precedence, highest first: the command line, the config file, the environment (for the few options that
read it, e.g. `OPENAI_BASE_URL`), then the defaults. `.env` only fills variables the environment does not
already have (python-dotenv's `override=False`), so an exported key always wins over the file.

The config file's keys are `run`'s long option names, with dashes or underscores (`prompt-file`,
`max_cost`); its values go through the very converters the command line uses (so `concurrency = 0` is
refused with the same words as `--concurrency 0`) and become the parser's defaults, which is what makes
a flag on the command line override them. Paths in it are read as if typed on the command line, i.e.
relative to the folder the command runs in.

Only the CLI imports this module; nothing here prints. Values of secrets are never returned: a key is
reported as set or not set, and where it came from.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DOTENV_NAME = ".env"
# The variables that hold secrets: shown as "set"/"not set" by `run --print-config`, never their values.
KEY_VARIABLES = (
    "OPENAI_API_KEY",
    "DASHSCOPE_API_KEY",
    "GEMINI_API_KEY",
    "OPENROUTER_API_KEY",
    "AZURE_OPENAI_API_KEY",
)
# Options a config file cannot hold: they are about reading the file itself or about the parser.
NOT_IN_CONFIG = {"config", "print-config", "help", "version"}
# Options that together say one thing: one of them on the command line replaces all of them from the file.
OVERRIDE_GROUPS = ({"prompt_files", "prompts_dir"}, {"limit", "sample"})

SOURCE_DEFAULT = "default"
SOURCE_COMMAND_LINE = "command line"
SOURCE_ENVIRONMENT = "environment"
SOURCE_DOTENV = ".env"


# --- the command that was typed ----------------------------------------------------------------------

def command_name(argv0: str) -> str:
    """How the user started us, for usage lines and hints: `reid-prompt` or `python -m pipeline`.

    The console script is `reid-prompt` on Linux and macOS, `reid-prompt.exe` (or, with older
    launchers, `reid-prompt-script.py`) on Windows; `python -m pipeline` runs `pipeline/__main__.py`.
    """
    name = re.split(r"[\\/]", argv0 or "")[-1].lower()
    for suffix in (".exe", "-script.pyw", "-script.py"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return "reid-prompt" if name == "reid-prompt" else "python -m pipeline"


# --- .env --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DotenvLoad:
    """What `.env` contributed: its path (None when there is none) and the variables it set."""

    path: Path | None = None
    loaded: frozenset[str] = frozenset()


def load_dotenv_file(folder: Path) -> DotenvLoad:
    """Read `<folder>/.env` into the environment with python-dotenv's rules; the environment wins.

    Only the current folder's file: python-dotenv's `find_dotenv` walks up to parent folders, which
    would pick up a key from some unrelated project above. A file saved by Notepad with a BOM is read
    too. The values are never printed; only the names of the variables set are returned.
    """
    from dotenv import dotenv_values

    path = Path(folder) / DOTENV_NAME
    if not path.is_file():
        return DotenvLoad()
    try:
        values = dotenv_values(path, encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text (save it as UTF-8)") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    loaded = set()
    for name, value in values.items():
        if value is None or name in os.environ:
            continue
        os.environ[name] = value
        loaded.add(name)
    return DotenvLoad(path, frozenset(loaded))


def variable_source(name: str, dotenv: DotenvLoad) -> str | None:
    """Where an environment variable's value came from: `.env`, the environment, or None (unset)."""
    if not os.environ.get(name, "").strip():
        return None
    return SOURCE_DOTENV if name in dotenv.loaded else SOURCE_ENVIRONMENT


# --- the config file ---------------------------------------------------------------------------------

@dataclass
class ConfigFile:
    """A parsed `--config` file: its path and the parser defaults it sets (dest -> converted value)."""

    path: Path
    values: dict[str, Any] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)  # file values the command line made void (a group)


def config_path_in(args: Sequence[str]) -> str | None:
    """The value of the last `--config X` / `--config=X` in a subcommand's arguments (None if absent)."""
    found: str | None = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--config" and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith("--config="):
            found = arg.split("=", 1)[1]
    return found


def option_key(text: str) -> str:
    """`--prompt_file`, `prompt-file`, `Prompt_File` -> `prompt-file`: how keys are compared."""
    return text.lstrip("-").replace("_", "-").lower()


def options_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every long option of `parser` under each of its spellings (see `option_key`)."""
    table: dict[str, argparse.Action] = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                table[option_key(opt)] = action
    return table


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML table of a config file; a missing or malformed file is one line (exit 2)."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise InputError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise InputError(f"config file {path} is a folder, not a file") from None
    except OSError as exc:
        raise InputError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"config file {path} is not UTF-8 text") from None


def config_defaults(data: dict[str, Any], parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """Check every key of a config file against `parser`'s options and convert its value as the command
    line would; returns dest -> value for `parser.set_defaults`. Raises InputError naming key and file."""
    table = options_by_key(parser)
    values: dict[str, Any] = {}
    given: dict[str, str] = {}  # dest -> the key that set it (two spellings of one option are refused)
    for key, raw in data.items():
        norm = option_key(key)
        if norm in NOT_IN_CONFIG:
            raise InputError(f"{path}: {key!r} cannot be set in a config file")
        action = table.get(norm)
        if action is None:
            close = difflib.get_close_matches(norm, [k for k in table if k not in NOT_IN_CONFIG], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"{path}: unknown option {key!r}{hint}; the keys are `run`'s long option names")
        if action.dest in given:
            raise InputError(f"{path}: {given[action.dest]!r} and {key!r} set the same option")
        given[action.dest] = key
        values[action.dest] = convert_value(action, raw, key, path)
    if values.get("limit") is not None and values.get("sample") is not None:  # as on the command line
        raise InputError(f"{path}: {given['limit']!r} and {given['sample']!r} cannot be combined")
    return values


def convert_value(action: argparse.Action, raw: Any, key: str, path: Path) -> Any:
    """One config value, converted and checked exactly as the same option on the command line."""
    where = f"{path}: {key}"
    if action.nargs == 0:  # a flag (store_true and the like): true sets it, false leaves the default
        if not isinstance(raw, bool):
            raise InputError(f"{where}: expected true or false, got {_show(raw)}")
        return action.const if raw else action.default
    if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)):
        items = raw if isinstance(raw, list) else [raw]
        return [_convert_one(action, item, where) for item in items]
    if isinstance(raw, list):
        raise InputError(f"{where}: expected one value, got a list")
    return _convert_one(action, raw, where)


def _convert_one(action: argparse.Action, raw: Any, where: str) -> Any:
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise InputError(f"{where}: expected {_expected(action)}, got {_show(raw)}")
    convert = action.type
    if not isinstance(raw, str) and (convert is None or convert in (str, Path)):
        raise InputError(f"{where}: expected {_expected(action)} in quotes, got {_show(raw)}")
    text = raw if isinstance(raw, str) else repr(raw)
    try:
        value = convert(text) if callable(convert) else text
    except argparse.ArgumentTypeError as exc:
        raise InputError(f"{where}: {exc}") from None
    except (TypeError, ValueError):
        raise InputError(f"{where}: invalid value {_show(raw)}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise InputError(f"{where}: {_show(raw)} is not one of {choices}")
    return value


def _expected(action: argparse.Action) -> str:
    if action.type in (None, str):
        return "text"
    if action.type is Path:
        return "a path"
    return "a value"


def _show(raw: Any) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, dict):
        return "a table"
    if isinstance(raw, list):
        return "a list"
    if isinstance(raw, (str, int, float)):
        return repr(raw)
    return type(raw).__name__


def load_config(path: Path, parser: argparse.ArgumentParser) -> ConfigFile:
    """Read a config file and make its values `parser`'s defaults (so the command line overrides them).

    An option the file sets is no longer required on the command line (`index = "..."` in the file
    makes `--index` optional).
    """
    values = config_defaults(read_config_file(path), parser, path)
    for action in parser._actions:
        if action.dest in values:
            action.required = False
    parser.set_defaults(**values)
    return ConfigFile(path, values)


# --- what came from where ----------------------------------------------------------------------------

_UNSET = object()


def given_on_command_line(parser: argparse.ArgumentParser, args: Sequence[str]) -> dict[str, Any]:
    """dest -> value of every option given in `args` (a subcommand's arguments, already known valid).

    Parsed a second time with every default replaced by a marker (appending options: None), so what
    still holds the marker was not typed. `parser` is changed: build a fresh one for this.
    """
    for action in parser._actions:
        action.required = False
        is_list = isinstance(action, (argparse._AppendAction, argparse._ExtendAction))
        action.default = None if is_list else _UNSET
    ns, _ = parser.parse_known_args(list(args))
    return {k: v for k, v in vars(ns).items() if v is not _UNSET and v is not None}


def apply_overrides(ns: argparse.Namespace, typed: dict[str, Any], config: ConfigFile | None) -> None:
    """Make the command line replace, not extend, what the file says.

    A repeatable option (`--prompt-file`) given on the command line replaces the file's list (argparse
    would append to it), and one option of a group (`--prompt-file`/`--prompts`, `--limit`/`--sample`)
    drops the file's values for the others (recorded in `config.dropped`).
    """
    if config is None:
        return
    for dest, value in typed.items():
        if isinstance(value, list):
            setattr(ns, dest, value)
    for group in OVERRIDE_GROUPS:
        if group & typed.keys():
            for dest in group - typed.keys():
                if dest in config.values:
                    setattr(ns, dest, [] if isinstance(config.values[dest], list) else None)
                    config.dropped.add(dest)


@dataclass(frozen=True)
class Setting:
    """One line of `run --print-config`."""

    option: str
    value: str
    source: str


def hide_secrets_in_url(url: str) -> str:
    """A URL with any user:password and query string hidden (a key can ride in either)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(not shown)"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "***" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def show_value(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ", ".join(show_value(v) for v in value) if value else "(none)"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def describe_settings(
    parser: argparse.ArgumentParser,
    ns: argparse.Namespace,
    typed: Iterable[str],
    config: ConfigFile | None,
    env: dict[str, tuple[str, str]] | None = None,
) -> list[Setting]:
    """Every option of `parser` with the value `ns` holds and where it came from.

    `env`: dest -> (value, source) for options left unset that an environment variable fills in
    (`--base-url` from `OPENAI_BASE_URL`). Hidden options are listed only when set.
    """
    typed = set(typed)
    env = env or {}
    rows: list[Setting] = []
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or option_key(longs[0]) in NOT_IN_CONFIG:
            continue
        value = getattr(ns, action.dest, None)
        if action.dest in typed:
            source = SOURCE_COMMAND_LINE
        elif config is not None and action.dest in config.dropped:
            source = f"default; config file {config.path} overridden by the command line"
        elif config is not None and action.dest in config.values:
            source = f"config file {config.path}"
        elif value is None and action.dest in env:
            value, source = env[action.dest]
        else:
            source = SOURCE_DEFAULT
        if action.help == argparse.SUPPRESS and source == SOURCE_DEFAULT:
            continue
        text = show_value(value)
        if "url" in action.dest and isinstance(value, str):
            text = hide_secrets_in_url(value)
        rows.append(Setting(longs[0], text, source))
    return rows


def key_lines(dotenv: DotenvLoad, always: Sequence[str] = ("OPENAI_API_KEY",)) -> list[Setting]:
    """Whether each key variable is set and where from; never a value. Unset ones only if in `always`."""
    rows = []
    for name in KEY_VARIABLES:
        source = variable_source(name, dotenv)
        if source is None and name not in always:
            continue
        where = "the environment" if source == SOURCE_ENVIRONMENT else source
        rows.append(Setting(name, "set" if source else "not set", f"from {where}" if source else ""))
    return rows


def render_settings(rows: Sequence[Setting], keys: Sequence[Setting]) -> list[str]:
    """Aligned plain-text lines: option, value, where it came from."""
    width = max((len(r.option) for r in rows), default=0)
    value_width = min(max((len(r.value) for r in rows), default=0), 48)
    lines = [f"  {r.option:<{width}}  {r.value:<{value_width}}  ({r.source})" for r in rows]
    lines += [f"  {k.option}: {k.value}" + (f" ({k.source})" if k.source else "") for k in keys]
    return lines
