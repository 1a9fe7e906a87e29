"""What a run does with the files an earlier run left in its workdir: the config check on resume, ``config.json``
kept, ``metrics.jsonl`` cut back to the restored step, stale files of a run without checkpoints moved aside.

Nothing is deleted: dropped metrics go to ``metrics.dropped.jsonl``, a stale history to ``metrics.<time>.jsonl``."""

from __future__ import annotations

import json
import logging
import pathlib
import time
import warnings
from typing import Any, Optional

from training.errors import ConfigMismatchError

log = logging.getLogger("tokenreduce.train")

# Fields that may differ between a checkpoint's config and the config that resumes it. None of them changes what
# the restored state means: run length (train.steps; the learning-rate schedule follows the new length), logging,
# progress, evaluation, checkpoint cadence, debugging aids and the device layout.
RESUME_MAY_CHANGE = (
    "train.steps", "train.log_every", "train.progress", "train.tensorboard", "train.crash_after_step",
    "train.allow_config_change", "train.debug_nans", "train.transfer_guard", "train.check_finite",
    "train.eval_every", "train.eval_at_end", "train.eval_batch_size", "data.eval_limit", "data.eval_split",
    "data.num_threads", "checkpoint.every", "checkpoint.keep", "checkpoint.use_async", "checkpoint.resume",
    "checkpoint.fallback", "checkpoint.save_frozen", "mesh.num_devices", "mesh.fsdp", "mesh.distributed",
)

_ABSENT = "<absent>"


def _plain(d: dict) -> dict:
    """JSON round trip (tuples -> lists, odd values -> str), as config.json and the checkpoint's meta store it."""
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict) and (d or not prefix):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_diff(saved: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``{dotted field: (saved value, new value)}`` for every leaf that differs (``"<absent>"`` on a missing side)."""
    a, b = _flatten(_plain(saved)), _flatten(_plain(new))
    return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def check_resume_config(saved: Optional[dict], new: dict, *, step: int, workdir: pathlib.Path,
                        allow: bool) -> dict[str, tuple[Any, Any]]:
    """Compare the config stored with checkpoint ``step`` to the config resuming it. Fields outside
    :data:`RESUME_MAY_CHANGE` that differ raise :class:`ConfigMismatchError` (listing them) unless ``allow``
    (``train.allow_config_change=True``), which logs a warning instead. Returns the whole diff."""
    if saved is None:
        return {}
    diff = config_diff(saved, new)
    refused = {k: v for k, v in diff.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        if not allow:
            raise ConfigMismatchError(
                f"resuming {workdir} from checkpoint step {step} with a different config: {listing}. "
                f"Resume with the checkpoint's config (it is in {workdir / 'config.json'} and in the checkpoint), "
                f"start in a new --workdir, or pass train.allow_config_change=True to resume with the new values "
                f"(they are then written to config.resume-{step}.json). Fields that may change on resume: "
                f"{', '.join(RESUME_MAY_CHANGE)}.")
        log.warning("train.allow_config_change=True: resuming from step %d with changed fields %s", step, listing)
    return diff


def write_run_config(cfg_dict: dict, workdir: pathlib.Path, start: int, diff: dict) -> Optional[pathlib.Path]:
    """``config.json`` is written once, by the run that starts the workdir, and never overwritten; a resumed run
    whose config differs from its checkpoint's writes ``config.resume-<step>.json``. Returns the file written."""
    text = json.dumps(cfg_dict, indent=2, sort_keys=True, default=str)
    first = workdir / "config.json"
    if start == 0 or not first.exists():
        if start == 0 and first.exists():
            aside(first, "config")
        first.write_text(text)
        return first
    if diff:
        path = workdir / f"config.resume-{start}.json"
        path.write_text(text)
        return path
    return None


def aside(path: pathlib.Path, stem: str) -> pathlib.Path:
    """Rename ``path`` to ``<stem>.<YYYYmmdd-HHMMSS>[-n]<suffix>`` next to it (never over an existing file)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    dest = path.with_name(f"{stem}.{stamp}{path.suffix}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{stem}.{stamp}-{n}{path.suffix}")
        n += 1
    path.rename(dest)
    return dest


def prepare_metrics(path: pathlib.Path, start: int) -> None:
    """Before the run appends to ``metrics.jsonl``: on a resume from step ``start`` keep the records with
    ``step <= start`` and move the others (and torn lines) to ``metrics.dropped.jsonl``; on a start from scratch
    move an old file aside to ``metrics.<time>.jsonl`` with a warning."""
    if not path.exists():
        return
    if start == 0:
        if path.stat().st_size:
            dest = aside(path, "metrics")
            msg = (f"{path} holds the history of an earlier run, but this run starts from scratch (no checkpoint to "
                   f"resume); moved it to {dest.name}")
            warnings.warn(msg, RuntimeWarning)
            log.warning(msg)
        else:
            path.unlink()
        return
    kept, dropped = [], []
    for line in path.read_text().splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            step = None
        if step is not None and step <= start:
            kept.append(line if line.endswith("\n") else line + "\n")
        else:
            dropped.append(line if line.endswith("\n") else line + "\n")
    if not dropped:
        return
    with open(path.with_name("metrics.dropped.jsonl"), "a") as f:
        f.write(f'{{"dropped_on_resume_from_step": {start}, "time": {json.dumps(time.strftime("%Y-%m-%d %H:%M:%S"))}}}\n')
        f.writelines(dropped)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)
    log.warning("resumed from step %d: moved %d metrics record(s) logged after that step from %s to "
                "metrics.dropped.jsonl", start, len(dropped), path.name)
