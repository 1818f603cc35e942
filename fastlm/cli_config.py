"""``--config FILE`` for fastlm commands: a file whose keys are the command's flag names.

YAML (``.yaml`` / ``.yml``, needs PyYAML, which accelerate already installs), TOML (``.toml``) or
JSON (``.json``). Keys are written like the flags without the dashes (``lora-r`` or ``lora_r``);
flags given on the command line win over the file::

    # sft.yaml                          fastlm sft --config sft.yaml --max-steps 10
    model: ./my-model
    data: train.jsonl
    lora-r: 32
    target-modules: [q_proj, v_proj]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from fastlm.errors import FastLMError

CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")


class ConfigError(FastLMError, ValueError):
    """A ``--config`` file cannot be read or has a key/value the command does not take."""


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML / TOML / JSON file. Usage: ``load_config_file("sft.yaml")``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        values = _load_json(text, path)
    elif suffix == ".toml":
        values = _load_toml(text, path)
    elif suffix in (".yaml", ".yml"):
        values = _load_yaml(text, path)
    else:
        raise ConfigError(f"--config {path}: use a {', '.join(CONFIG_SUFFIXES)} file")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: the file must hold a mapping of flag names to values")
    return values


def _unparsable(path: Path, error: Exception) -> ConfigError:
    return ConfigError(f"--config {path}: cannot parse it: {error}")


def _load_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise _unparsable(path, error) from None


def _load_toml(text: str, path: Path) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(
                "TOML config files need Python 3.11+ or `pip install tomli`"
            ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise _unparsable(path, error) from None


def _load_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(
            "YAML config files need PyYAML (`pip install pyyaml`); or use a .json / .toml file"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise _unparsable(path, error) from None


def apply_config(
    parser: argparse.ArgumentParser, values: dict[str, Any], source: str = "--config"
) -> dict[str, Any]:
    """Check ``values`` against ``parser``'s flags and make them its defaults; returns them by dest.

    Usage: ``apply_config(sub_parser, load_config_file(path)); args = parser.parse_args(argv)``
    (flags given on the command line then override the file).
    """
    by_name: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in (argparse.SUPPRESS, "help", "config"):
            continue
        by_name[action.dest] = action
        for option in action.option_strings:
            by_name[option.lstrip("-").replace("-", "_")] = action
    defaults = {}
    for key, value in values.items():
        action = by_name.get(str(key).replace("-", "_"))
        if action is None:
            known = sorted({a.dest.replace("_", "-") for a in by_name.values()})
            raise ConfigError(f"{source}: unknown key {key!r}; the keys are: {', '.join(known)}")
        defaults[action.dest] = _convert(action, key, value, source)
    parser.set_defaults(**defaults)
    return defaults


def _convert(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """The value as the flag would have parsed it (type, choices, lists, booleans)."""
    where = f"{source}: {key}"
    if value is None:  # null: the flag's own default
        return action.default
    flags = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)
    if isinstance(action, flags):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        if isinstance(action, argparse._StoreFalseAction):
            return not value
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if isinstance(value, list):
        if not many:
            raise ConfigError(f"{where} takes one value, got a list {value!r}")
        return [_one(action, item, where) for item in value]
    if many:
        return [_one(action, value, where)]
    return _one(action, value, where)


def _one(action: argparse.Action, value: Any, where: str) -> Any:
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: expected a single value, got {value!r}")
    if action.type is not None and value is not None:
        try:
            value = action.type(value if isinstance(value, str) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            raise ConfigError(f"{where}: {value!r} is not valid ({error})") from None
    elif value is not None and not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{where}: {value!r} is not one of {choices}")
    return value
