"""Config loading shared by ``train.py`` and ``eval.py``.

A config is a Python file in this folder defining ``get_config() -> ml_collections.ConfigDict``.
Command-line overrides are ``key.sub=value`` strings. The config is locked before overrides apply, so a
typo in a field name raises an error that names the field (``ml_collections`` suggests close matches);
values are parsed as Python literals and must keep the field's type.

Reduction specs (``model.reduction`` for a ViT, ``model.plan`` for the VLM, and each entry of an eval config's
``options``) are open: any option of the spec's method may be set field by field
(``model.reduction.keep_ratio=0.5``), and the spec is checked against the method's options afterwards, so a
misspelt option is named together with the valid ones. Changing ``method`` on the command line starts the spec
afresh from that method's defaults (the preset's options belonged to its method; ``point`` is kept), whatever the
order of the overrides. A whole spec is one override too: ``"model.reduction={'method': 'pitome', 'keep_ratio': 0.9}"``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
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


# Config paths holding a reduction spec, and the point each is checked at ("options.*": every child of options).
SPEC_NODES = {"model.reduction": "vit", "model.plan": None}


def _split(item: str) -> tuple[str, str]:
    item = item[2:] if item.startswith("--") else item
    if item.startswith("config."):
        item = item[len("config."):]
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like field.sub=value")
    return tuple(item.split("=", 1))


def _spec_paths(cfg: ml_collections.ConfigDict) -> list[str]:
    paths = []
    for path in SPEC_NODES:
        node = _node(cfg, path)
        if isinstance(node, ml_collections.ConfigDict):
            paths.append(path)
    options = cfg.get("options") if isinstance(cfg, ml_collections.ConfigDict) else None
    if isinstance(options, ml_collections.ConfigDict):
        paths += [f"options.{name}" for name in options.keys()
                  if isinstance(options[name], ml_collections.ConfigDict)]
    return paths


def _node(cfg, path: str):
    node = cfg
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def spec_from_node(node) -> dict:
    """A spec node as a plain dict: ``None``, ``""`` and empty tuples dropped (presets may list unused fields),
    tuples as lists."""
    out = {}
    for k, v in (node.to_dict() if hasattr(node, "to_dict") else dict(node)).items():
        if v is None or v == "" or v == () or v == []:
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def check_spec_node(path: str, node) -> None:
    """Raise :class:`ConfigError` when the spec at ``path`` names an unknown method or option."""
    import reduction as R
    from reduction.reducers import method_info

    spec = spec_from_node(node)
    point = spec.pop("point", SPEC_NODES.get(path) or "vit")
    if path.startswith("options."):
        # fixed options of a method, whatever point it runs at in the sweep: check them at one of its own points
        spec.setdefault("method", path.split(".", 1)[1])
        if "point" not in node:
            try:
                point = method_info(spec["method"]).points[0]
            except R.SpecError as err:
                raise ConfigError(f"{path}: {err}") from None
    if point == "none" or spec.get("method", "none") == "none":
        return
    if point in ("vision", "connector", "llm") or point == "vit":
        try:
            R.check_spec(spec, point)
        except R.SpecError as err:
            raise ConfigError(f"{path}: {err}") from None
    else:
        raise ConfigError(f"{path}.point must be one of none, vision, connector, llm; got {point!r}")


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Apply ``a.b=value`` overrides to a locked config. Unknown fields raise :class:`ConfigError`; reduction specs
    take any option of their method (see the module docstring)."""
    overrides = [_split(item) for item in overrides]
    spec_paths = _spec_paths(cfg)
    # a changed method restarts its spec from the method's defaults, before any of its options apply
    for key, text in overrides:
        path, _, leaf = key.rpartition(".")
        if leaf == "method" and path in spec_paths:
            node = _node(cfg, path)
            kept = {k: node[k] for k in ("point",) if k in node}
            with node.unlocked():
                for k in list(node.keys()):
                    del node[k]
                node.update(dict(kept, method=_parse_value(text, "")))
    cfg.lock()
    for key, text in overrides:
        path, _, leaf = key.rpartition(".")
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "options" and isinstance(cfg.get("options"), ml_collections.ConfigDict) \
                and parts[1] not in cfg.options:
            with cfg.options.unlocked():      # options.<method>.<option>=value creates the method's entry
                cfg.options[parts[1]] = ml_collections.ConfigDict()
            spec_paths.append(f"options.{parts[1]}")
        if path in spec_paths or (path == "options" and "options" in cfg):
            node = _node(cfg, path)
            value = _parse_value(text, node[leaf] if leaf in node else None)
            with node.unlocked():
                is_node = leaf in node and isinstance(node[leaf], ml_collections.ConfigDict)
                if leaf in node:
                    del node[leaf]             # spec options take any type (an int r may become a list)
                if isinstance(value, dict) and (is_node or path == "options"):
                    node[leaf] = ml_collections.ConfigDict(value)
                else:
                    node[leaf] = value
            if path == "options" and isinstance(node[leaf], ml_collections.ConfigDict):
                spec_paths.append(f"options.{leaf}")
            continue
        if key in spec_paths:       # a whole spec as one override
            parent_path, _, name = key.rpartition(".")
            parent = _node(cfg, parent_path) if parent_path else cfg
            value = _parse_value(text, None)
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a dict spec such as {{'method': 'tome', 'r': 8}}, got {text!r}")
            with parent.unlocked():
                parent[name] = ml_collections.ConfigDict(value)
            continue
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
    for path in _spec_paths(cfg):
        check_spec_node(path, _node(cfg, path))
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


# (field, lowest allowed value, what 0 means when 0 is allowed) of the training config, checked before anything
# is built or compiled. ``every`` fields: 0 = only at the end of the run (like ``train.eval_every``).
TRAIN_INT_FIELDS = (
    ("train.steps", 1, None),
    ("train.batch_size", 1, None),
    ("train.eval_batch_size", 1, None),
    ("train.log_every", 0, "0 = log only the last step"),
    ("train.eval_every", 0, "0 = evaluate only at the end"),
    ("checkpoint.every", 0, "0 = save only at the end"),
    ("checkpoint.keep", 1, None),
    ("optim.warmup_steps", 0, None),
)


def check_train_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise :class:`ConfigError` naming the field and its allowed range when a training field cannot work
    (``train.steps=-5``, ``checkpoint.keep=0``, a negative ``log_every``, ...). ``train.py`` calls it before the
    model is built."""
    for path, low, zero in TRAIN_INT_FIELDS:
        node = _node(cfg, path)
        if node is None:
            continue
        if isinstance(node, bool) or not isinstance(node, int):
            raise ConfigError(f"{path} must be an integer >= {low}, got {node!r}")
        if node < low:
            note = f" ({zero})" if zero else ""
            raise ConfigError(f"{path}={node} is out of range: it must be an integer >= {low}{note}")
    prof = _node(cfg, "train.profile_steps")
    if prof is not None and tuple(prof) != ():
        ok = (len(tuple(prof)) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in prof)
              and 0 <= prof[0] < prof[1])
        if not ok:
            raise ConfigError(f"train.profile_steps={tuple(prof)!r} is out of range: it must be () or (start, stop) "
                              f"with 0 <= start < stop (steps, counted from 0)")
    lr = _node(cfg, "optim.lr")
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ConfigError(f"optim.lr={lr!r} is out of range: it must be a finite number >= 0")
    check_recipe_config(cfg)


def check_data_provided(cfg: ml_collections.ConfigDict) -> None:
    """A preset that trains on data the user provides (``data.name="image_folder"``) without ``data.path``:
    :class:`ConfigError` saying what to pass and the folder layout. The trainer calls it before reading any data or
    building the model (``check_train_config`` stays a pure range check, so every preset passes it as shipped)."""
    if _node(cfg, "data.name") == "image_folder" and not _node(cfg, "data.path"):
        splits = f"{_node(cfg, 'data.train_split') or 'train'}/ and {_node(cfg, 'data.eval_split') or 'val'}/"
        raise ConfigError(
            f"config {cfg.get('config_name', '') or '?'!r} trains on an image folder you provide: pass "
            f"data.path=/path/to/imagenet, a folder holding {splits} with one sub-folder per class (images inside, "
            f"e.g. train/n01440764/*.JPEG; ImageNet-1k has 1000 classes, matching model.vit.num_classes="
            f"{_node(cfg, 'model.vit.num_classes')}); nothing is downloaded")


def _number(path, value, lo, hi, *, lo_open=False, hi_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{path}={value!r} is out of range: it must be a number in {rng}")


def check_recipe_config(cfg: ml_collections.ConfigDict) -> None:
    """The DeiT-recipe fields (augmentation, Mixup / CutMix, EMA, stochastic depth): :class:`ConfigError` naming the
    field and its range. Fields absent from a config are not checked."""
    for path, lo, hi, lo_open, hi_open in (
            ("data.augment.erase_prob", 0, 1, False, False), ("train.mixup_alpha", 0, math.inf, False, True),
            ("train.cutmix_alpha", 0, math.inf, False, True), ("train.mix_prob", 0, 1, False, False),
            ("train.mix_switch_prob", 0, 1, False, False), ("train.ema_decay", 0, 1, False, True),
            ("model.vit.drop_path_rate", 0, 1, False, True), ("train.label_smoothing", 0, 1, False, True)):
        value = _node(cfg, path)
        if value is not None:
            _number(path, value, lo, hi, lo_open=lo_open, hi_open=hi_open)
    for path in ("data.augment.rrc_scale", "data.augment.rrc_ratio"):
        value = _node(cfg, path)
        if value is None:
            continue
        v = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        ok = len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) and 0 < v[0] <= v[1]
        if ok and path.endswith("scale"):
            ok = v[1] <= 1
        if not ok:
            raise ConfigError(f"{path}={value!r} is out of range: it must be (low, high) with 0 < low <= high"
                              f"{' <= 1' if path.endswith('scale') else ''}")
    spec = _node(cfg, "data.augment.randaugment")
    if spec:
        from data.augment import parse_randaugment

        try:
            parse_randaugment(str(spec))
        except ValueError as err:
            raise ConfigError(f"data.augment.randaugment={spec!r}: {err}") from None
    mixing = any((_node(cfg, p) or 0) > 0 for p in ("train.mixup_alpha", "train.cutmix_alpha"))
    task = _node(cfg, "task")
    if mixing and task not in (None, "classification"):
        raise ConfigError(f"train.mixup_alpha / train.cutmix_alpha need task='classification' (soft class targets), "
                          f"got task={task!r}; set both to 0.0")
    if (_node(cfg, "model.vit.drop_path_rate") or 0) > 0 and _node(cfg, "model.kind") not in (None, "vit"):
        raise ConfigError(f"model.vit.drop_path_rate is wired into the ViT only (model.kind='vit'), got "
                          f"model.kind={_node(cfg, 'model.kind')!r}")


def available_configs() -> list[str]:
    return sorted(q.stem for q in CONFIG_DIR.glob("*.py") if not q.stem.startswith("_"))


def help_epilog(kind: str = "train") -> str:
    """``--help`` text shared by ``train.py`` and ``eval.py``: the presets (first docstring line), how overrides and
    reduction specs are written, and every registered method with its points and options."""
    import reduction as R

    lines = ["presets (--config NAME; --print-config shows every field of one):"]
    for name in available_configs():
        if name.startswith("eval") != (kind == "eval"):
            continue
        text = config_path(name).read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        para = " ".join(doc.split("\n\n")[0].split())
        lines.append(f"  {name:20s} {para.split('. ')[0].rstrip('.')}.")
    lines += ["", "overrides: field.sub=value (Python literals; bare strings need no quotes). Reduction specs take",
              "  any option of their method: model.reduction.method=pitome model.reduction.keep_ratio=0.9, or one",
              "  override \"model.reduction={'method': 'dart', 'keep_ratio': 0.5, 'layers': [3, 6, 9]}\"; the VLM's",
              "  model.plan adds point=vision|connector|llm. Changing method resets the spec to that method's defaults.",
              "", R.describe_methods()]
    return "\n".join(lines)
