"""Config loading shared by ``train.py`` and ``eval.py``.

A config is a Python file in this folder defining ``get_config() -> ml_collections.ConfigDict``.
Command-line overrides are ``key.sub=value`` strings. The config is locked before overrides apply, so a
typo in a field name raises an error that names the field (``ml_collections`` suggests close matches);
values are parsed as Python literals and must keep the field's type.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pathlib
from typing import Any, Iterable

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A config file or an override that cannot be applied."""


def config_path(name_or_path: str) -> pathlib.Path:
    """``"vit_fmnist"``, ``"configs/vit_fmnist.py"`` or any path to a ``.py`` file."""
    p = pathlib.Path(name_or_path)
    if p.suffix != ".py":
        p = CONFIG_DIR / f"{name_or_path}.py"
    if not p.exists():
        available = sorted(q.stem for q in CONFIG_DIR.glob("*.py") if not q.stem.startswith("_"))
        raise ConfigError(f"config {name_or_path!r} not found; available: {', '.join(available)}")
    return p


def _parse_value(text: str, current: Any) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # bare strings need no quotes
    if isinstance(current, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Apply ``a.b=value`` overrides to a locked config. Unknown fields raise :class:`ConfigError`."""
    cfg.lock()
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if item.startswith("config."):
            item = item[len("config."):]
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like field.sub=value")
        key, text = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = cfg
        walked = []
        for part in parents + [leaf]:
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                where = ".".join(walked) or "<root>"
                raise ConfigError(f"unknown config field {key!r}: {where} has no field {part!r}; fields: {fields}")
            if part != leaf or walked != parents:
                node = node[part]
            walked.append(part)
        parent = cfg
        for part in parents:
            parent = parent[part]
        current = parent[leaf]
        value = _parse_value(text, current)
        try:
            parent[leaf] = value
        except TypeError as err:
            raise ConfigError(f"config field {key!r}: {err}") from None
    return cfg


def load_config(name_or_path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Import the config file, call its ``get_config()``, apply overrides."""
    path = config_path(name_or_path)
    spec = importlib.util.spec_from_file_location(f"_tokenreduce_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    cfg = module.get_config()
    cfg = apply_overrides(cfg, overrides)
    with cfg.unlocked():
        cfg.config_name = path.stem if "config_name" not in cfg else cfg.config_name
    return cfg


def save_config(cfg: ml_collections.ConfigDict, directory: str | pathlib.Path, name: str = "config.json") -> pathlib.Path:
    """Write the resolved config as JSON next to a checkpoint or result."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str))
    return path
