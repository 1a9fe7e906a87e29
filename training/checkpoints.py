"""Orbax checkpoints of a run (model + optimizer + step + data-iterator position + config), with an integrity
fingerprint and fallback to an older step when the newest is damaged."""

from __future__ import annotations

import logging
import pathlib
import shutil
import time
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np



from training.errors import CheckpointError

log = logging.getLogger("tokenreduce.train")


# -- checkpoints --------------------------------------------------------------------------------------------


@jax.jit
def _fingerprint(params):
    """Two float32 sums per checkpoint: a cheap guard against silently corrupted array data."""
    leaves = jax.tree.leaves(params)
    s = sum(jnp.sum(x.astype(jnp.float32)) for x in leaves)
    a = sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves)
    return jnp.stack([s, a])


class Checkpoints:
    """Orbax ``CheckpointManager`` with items ``state`` (model + optimizer + step), ``data_iter`` (grain
    iterator state) and ``meta`` (resolved config, fingerprint). Keeps the last ``keep`` steps, async."""

    def __init__(self, directory: pathlib.Path, *, keep: int, use_async: bool):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = pathlib.Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data_iter", "meta"))

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        ocp = self.ocp
        meta = dict(meta, fingerprint=[float(v) for v in jax.device_get(_fingerprint(state["params"]))])
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data_iter=ocp.args.JsonSave(data_state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def peek_meta(self) -> Optional[tuple[int, dict]]:
        """``(step, meta)`` of the newest checkpoint (the small JSON item only), or ``None`` when there is no
        checkpoint or its meta cannot be read (:meth:`restore` then reports or falls back)."""
        steps = self.steps()
        if not steps:
            return None
        try:
            out = self.manager.restore(steps[-1], args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore()))
            return steps[-1], dict(out["meta"])
        except Exception:  # damaged: left to restore()
            return None

    def restore(self, abstract_state, *, fallback: bool) -> Optional[tuple[int, Any, dict, dict]]:
        """Newest readable checkpoint -> ``(step, state, data_state, meta)``, or ``None`` if there is none.

        A damaged newest checkpoint raises :class:`CheckpointError` unless ``fallback`` is set, in which
        case older steps are tried in turn (with a warning for each damaged one)."""
        ocp = self.ocp
        steps = self.steps()
        for i, step in enumerate(reversed(steps)):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data_iter=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
                state, meta = out["state"], out["meta"]
                got = np.asarray(jax.device_get(_fingerprint(state["params"])), np.float64)
                want = np.asarray(meta["fingerprint"], np.float64)
                if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
                    raise CheckpointError(f"parameter fingerprint {got.tolist()} != saved {want.tolist()}")
                if int(jax.device_get(state["step"])) != step:
                    raise CheckpointError(f"state.step {int(state['step'])} != directory step {step}")
                return step, state, out["data_iter"], meta
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                where = self.directory / str(step)
                msg = (f"checkpoint step {step} in {str(where)!r} is damaged or unreadable: "
                       f"{type(err).__name__}: {str(err)[:300]}")
                if not fallback:
                    raise CheckpointError(msg + " (set checkpoint.fallback=True to use the previous one, "
                                          "or delete that directory)") from err
                older = steps[len(steps) - 2 - i] if i + 1 < len(steps) else None
                moved = self.quarantine(step)
                warnings.warn(msg + f"; moved it to {str(moved)!r}" +
                              (f"; falling back to step {older}" if older is not None else
                               "; no older checkpoint, starting from scratch"), RuntimeWarning)
                log.warning(msg)
        return None

    def quarantine(self, step: int) -> pathlib.Path:
        """Move a damaged step out of the manager's folder (kept for inspection) so it is not reused."""
        dest = self.directory.parent / "damaged_checkpoints" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            shutil.move(str(self.directory / str(step)), str(dest))
        self.manager.reload()
        return dest

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
