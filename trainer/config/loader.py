"""Load a preset or TOML file into the config tree, apply `--set a.b=c` overrides, validate, dump."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import tomllib

from trainer.config.schema import Config, ConfigError

PRESET_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def resolve_config_path(preset_or_file: str) -> Path:
    """A preset name (`tiny`) or a path to a TOML file."""
    path = Path(preset_or_file)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config: no such file {path}")
        return path
    preset = PRESET_DIR / f"{preset_or_file}.toml"
    if not preset.is_file():
        raise ConfigError(
            f"--config: unknown preset {preset_or_file!r}; presets: {', '.join(preset_names())}"
        )
    return preset


def load_config(preset_or_file: str = "tiny", overrides: list[str] | None = None) -> Config:
    """Build the validated config: defaults < preset/file < overrides."""
    path = resolve_config_path(preset_or_file)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    cfg = Config()
    _apply_dict(cfg, raw, prefix="", source=str(path))
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg.validate()


def apply_override(cfg: Config, item: str) -> None:
    """`a.b.c=value`; value is parsed as TOML (so 3, 1e-3, true, "x", [1, 2] work) or taken as a bare string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            raise ConfigError(f"--set {key}: no section {'.'.join(parts[: depth + 1])!r}")
        node = getattr(node, part)
    _set_field(node, parts[-1], value, name=key, source="--set")


def _apply_dict(node: Any, raw: dict[str, Any], prefix: str, source: str) -> None:
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if not hasattr(node, key) or key not in {f.name for f in dataclasses.fields(node)}:
            raise ConfigError(f"{source}: unknown field {name!r}")
        current = getattr(node, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name} must be a table, got {type(value).__name__}")
            _apply_dict(current, value, prefix=f"{name}.", source=source)
        else:
            _set_field(node, key, value, name=name, source=source)


def _set_field(node: Any, key: str, value: Any, name: str, source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(node)}
    if key not in fields:
        raise ConfigError(f"{source}: unknown field {name!r}")
    hint = typing.get_type_hints(type(node))[key]
    if dataclasses.is_dataclass(hint):
        raise ConfigError(f"{source}: {name} is a section; set one of its fields")
    setattr(node, key, _coerce(value, hint, name, source))


def _coerce(value: Any, hint: Any, name: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, bool, str):
        if type(value) is not hint:
            raise ConfigError(f"{source}: {name} must be {hint.__name__}, got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
        return [_coerce(v, item_type, f"{name}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} must be a table, got {value!r}")
        return {
            _coerce(k, key_type, name, source): _coerce(v, value_type, f"{name}.{k}", source)
            for k, v in value.items()
        }
    raise ConfigError(f"{source}: {name} has an unsupported type {hint}")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML that `--config FILE` loads back to the same tree."""
    lines: list[str] = []

    def emit(table: dict[str, Any], path: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) or not _is_section(path, k)}
        sections = {k: v for k, v in table.items() if k not in scalars}
        if path:
            lines.append(f"\n[{path}]")
        for key, value in scalars.items():
            lines.append(f"{key} = {_toml_value(value)}")
        for key, value in sections.items():
            emit(value, f"{path}.{key}" if path else key)

    def _is_section(path: str, key: str) -> bool:
        node: Any = cfg
        for part in [p for p in path.split(".") if p] + [key]:
            node = getattr(node, part, None)
        return dataclasses.is_dataclass(node)

    emit(config_to_dict(cfg), "")
    return "\n".join(lines).lstrip() + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")
