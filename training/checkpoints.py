"""Orbax checkpoints of a run (model + optimizer + step + data-iterator position + config), with an integrity
record over every restored byte and fallback to an older step when the newest is damaged.

Integrity: ``meta["integrity"]`` holds two exact uint32 digests of the bit pattern of every array in ``state``
(parameters, optimizer moments, model state, step; keyed by leaf path), the sha256 of the canonical JSON of
``data_iter`` and of the rest of ``meta``. A mismatch on restore is a :class:`CheckpointError` naming the part
(e.g. ``integrity fingerprint mismatch in the optimizer state ... 'opt/0/mu/...'``), handled like an unreadable file (fallback /
quarantine). Checkpoints written before this record are checked with the old parameter sums."""

from __future__ import annotations

import hashlib
import json
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
    """Two float32 sums of the parameters: the check of checkpoints written before :func:`state_digest`
    (their ``meta`` has ``fingerprint`` but no ``integrity``)."""
    leaves = jax.tree.leaves(params)
    s = sum(jnp.sum(x.astype(jnp.float32)) for x in leaves)
    a = sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves)
    return jnp.stack([s, a])


def _words(x):
    """The bytes of one array as uint32 words (exact: a bit cast, never a value conversion)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    size = jnp.dtype(x.dtype).itemsize
    if size == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32).reshape(-1)
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32).reshape(-1)
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)   # 8 bytes -> [..., 2] words


@jax.jit
def _leaf_digests(tree):
    """``[leaves, 2]`` uint32: two position-weighted sums (mod 2**32) of every leaf's bit pattern.

    Integer sums do not depend on the reduction order, so the digest is the same on any device layout. Each
    weight is odd, so changing any one word (any bit flip) always changes both sums; unrelated damage to many
    words matches by chance with probability about 2**-64. Not a cryptographic hash."""
    rows = []
    for x in jax.tree.leaves(tree):
        w = _words(x)
        i = jnp.arange(w.size, dtype=jnp.uint32)
        k1 = i * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15) | jnp.uint32(1)
        k2 = (i ^ jnp.uint32(0x5BD1E995)) * jnp.uint32(0x85EBCA6B) | jnp.uint32(1)
        mixed = w ^ (w >> 15) ^ jnp.uint32(w.size)
        rows.append(jnp.stack([jnp.sum(w * k1, dtype=jnp.uint32), jnp.sum(mixed * k2, dtype=jnp.uint32)]))
    if not rows:
        return jnp.zeros((0, 2), jnp.uint32)
    return jnp.stack(rows)


def state_digest(state) -> dict[str, list[int]]:
    """``{leaf path: [d1, d2]}`` over every array of ``state`` (parameters, optimizer moments, step, ...)."""
    paths = ["/".join(_key_str(k) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(state)]
    rows = np.asarray(jax.device_get(_leaf_digests(state))).astype(np.int64).tolist()
    return dict(zip(paths, rows))


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def json_digest(obj) -> str:
    """sha256 of the canonical JSON text (sorted keys) of ``obj`` after a JSON round trip."""
    text = json.dumps(json.loads(json.dumps(obj, sort_keys=True, default=str)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _part(path: str) -> str:
    head = path.split("/", 1)[0]
    return {"params": "parameters", "opt": "optimizer state", "rest": "model state", "step": "step"}.get(head, head)


def check_integrity(state, data_state, meta) -> None:
    """Raise :class:`CheckpointError` naming the first damaged part (leaf path, ``data_iter`` or ``meta``) when
    the restored items do not match the digests written with them."""
    rec = meta.get("integrity")
    if rec is None:
        if "fingerprint" not in meta:
            raise CheckpointError("meta has no integrity record (neither 'integrity' nor 'fingerprint')")
        got = np.asarray(jax.device_get(_fingerprint(state["params"])), np.float64)   # older checkpoints
        want = np.asarray(meta["fingerprint"], np.float64)
        if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
            raise CheckpointError(f"parameter fingerprint {got.tolist()} != saved {want.tolist()}")
        return
    got, want = state_digest(state), rec.get("state", {})
    if set(got) != set(want):
        raise CheckpointError(f"integrity fingerprint: state leaves differ from the saved record: missing "
                              f"{sorted(set(want) - set(got))[:5]}, unexpected {sorted(set(got) - set(want))[:5]}")
    bad = [k for k in got if list(got[k]) != list(want[k])]
    if bad:
        raise CheckpointError(f"integrity fingerprint mismatch in the {_part(bad[0])}: {len(bad)} array(s), first "
                              f"{bad[0]!r}: the array data was changed or damaged after saving")
    body = {k: v for k, v in meta.items() if k != "integrity"}
    if json_digest(body) != rec.get("meta"):
        raise CheckpointError("integrity fingerprint mismatch in meta (config): the meta item was changed or damaged")
    if json_digest(data_state) != rec.get("data_iter"):
        raise CheckpointError("integrity fingerprint mismatch in data_iter: the data-iterator state was changed or damaged")


class Checkpoints:
    """Orbax ``CheckpointManager`` with items ``state`` (model + optimizer + step), ``data_iter`` (grain
    iterator state) and ``meta`` (resolved config, and the integrity record: a digest of every state array, of
    ``data_iter`` and of the rest of ``meta``, checked on restore). Keeps the last ``keep`` steps, async."""

    def __init__(self, directory: pathlib.Path, *, keep: int, use_async: bool):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = pathlib.Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data_iter", "meta"))

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        ocp = self.ocp
        meta = json.loads(json.dumps(meta, sort_keys=True, default=str))     # exactly what JsonSave writes
        data_state = json.loads(json.dumps(data_state, sort_keys=True, default=str))
        meta["integrity"] = {"state": state_digest(state), "data_iter": json_digest(data_state),
                             "meta": json_digest(meta)}
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
        case older steps are tried in turn (with a warning for each damaged one). ``abstract_state`` may be a
        function of the step's ``meta`` (read first), for checkpoints whose tree depends on it (:class:`FrozenSplit`)."""
        ocp = self.ocp
        steps = self.steps()
        for i, step in enumerate(reversed(steps)):
            try:
                tree = abstract_state
                if callable(abstract_state):
                    head = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
                    tree = abstract_state(dict(head["meta"]))
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(tree), data_iter=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
                state, meta = out["state"], out["meta"]
                check_integrity(state, out["data_iter"], meta)
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


# -- checkpoints without the frozen parts ---------------------------------------------------------------------

FROZEN_LAYOUT = "trainable-only"


def _nest(flat: dict) -> dict:
    """``{"a/b/c": leaf}`` -> ``{"a": {"b": {"c": leaf}}}`` (string keys: what Orbax stores and restores)."""
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


class FrozenSplit:
    """The parameters of a run split by ``optim.trainable`` / ``optim.frozen`` labels (``"train"`` / ``"frozen"``,
    one per leaf of ``params`` in ``jax.tree.leaves`` order).

    With ``active`` the checkpoints hold ``{"params": <trainable leaves only, nested by path>, "rest", "opt",
    "step"}`` and ``meta["frozen"]`` records where the frozen parameters come from (``sources``) and a digest of
    each part of them (first path component, e.g. ``language_model``); a resume rebuilds the frozen parameters
    from their sources, and :meth:`check` refuses with :class:`CheckpointError` when their digest differs from the
    one the checkpoint was trained with. Checkpoints without ``meta["frozen"]`` (written before this layout, or with
    ``checkpoint.save_frozen=True``) hold every parameter and restore whole."""

    def __init__(self, params, labels, *, active: bool, sources: Optional[dict] = None):
        from training.run_params import flat_paths

        self.paths = list(flat_paths(params))
        self.frozen = [lbl == "frozen" for lbl in jax.tree.leaves(labels)] if labels is not None else \
            [False] * len(self.paths)
        if len(self.frozen) != len(self.paths):
            raise ValueError(f"{len(self.frozen)} labels for {len(self.paths)} parameters")
        self.active = bool(active and any(self.frozen))
        self.sources = dict(sources or {})

    # views of a state (concrete or abstract) ------------------------------------------------------------------

    def view(self, state) -> dict:
        """``state`` with only the trainable parameters (the tree a ``trainable-only`` checkpoint holds)."""
        leaves = jax.tree.leaves(state["params"])
        trainable = {p: x for p, x, f in zip(self.paths, leaves, self.frozen) if not f}
        return {**{k: v for k, v in state.items() if k != "params"}, "params": _nest(trainable)}

    def merge(self, state, restored) -> dict:
        """``state`` (frozen parameters rebuilt from their sources) with the trainable parameters, optimizer state,
        model state and step of a restored ``trainable-only`` checkpoint."""
        from training.run_params import flat_paths

        got = flat_paths(restored["params"])
        leaves, treedef = jax.tree.flatten(state["params"])
        merged = [x if f else got[p] for p, x, f in zip(self.paths, leaves, self.frozen)]
        return {**{k: v for k, v in restored.items() if k != "params"},
                "params": jax.tree.unflatten(treedef, merged)}

    # the record of the frozen parts ---------------------------------------------------------------------------

    def frozen_parts(self, params) -> dict[str, dict]:
        """``{part: {"digest", "leaves", "bytes"}}`` of the frozen parameters (sha256 over the exact per-leaf
        digests of :func:`state_digest`, so any changed bit changes it)."""
        leaves = jax.tree.leaves(params)
        frozen = {p: x for p, x, f in zip(self.paths, leaves, self.frozen) if f}
        digests = state_digest(frozen) if frozen else {}
        parts: dict[str, dict] = {}
        for p, x in frozen.items():
            part = parts.setdefault(p.split("/", 1)[0], {"rows": [], "leaves": 0, "bytes": 0})
            part["rows"].append([p, digests[p]])
            part["leaves"] += 1
            part["bytes"] += int(x.size) * jnp.dtype(x.dtype).itemsize
        return {name: {"digest": json_digest(sorted(v["rows"])), "leaves": v["leaves"], "bytes": v["bytes"]}
                for name, v in parts.items()}

    def record(self, params) -> dict:
        """``meta["frozen"]``: the layout, the sources and the per-part digests of ``params``' frozen leaves."""
        return {"layout": FROZEN_LAYOUT, "sources": self.sources, "parts": self.frozen_parts(params)}

    def check(self, saved: dict, params, *, step: int, directory) -> None:
        """Refuse (:class:`CheckpointError`) when the frozen parameters rebuilt now differ from the ones checkpoint
        ``step`` was trained with (another file, dtype, seed or loader), naming the part and both sources."""
        if saved.get("layout") != FROZEN_LAYOUT:
            raise CheckpointError(f"checkpoint step {step} in {str(directory)!r} has an unknown frozen-parameter "
                                  f"layout {saved.get('layout')!r} (this version reads {FROZEN_LAYOUT!r})")
        now = self.frozen_parts(params)
        want = saved.get("parts", {})
        bad = sorted(k for k in set(now) | set(want) if now.get(k, {}).get("digest") != want.get(k, {}).get("digest"))
        if bad:
            raise CheckpointError(
                f"checkpoint step {step} in {str(directory)!r} holds only the trainable state; its frozen parameters "
                f"are rebuilt from their sources, but part(s) {bad} differ from the ones it was trained with "
                f"(saved sources {json.dumps(saved.get('sources', {}), sort_keys=True)}; now "
                f"{json.dumps(self.sources, sort_keys=True)}; digests saved "
                f"{[want.get(k, {}).get('digest', '<absent>')[:12] for k in bad]}, now "
                f"{[now.get(k, {}).get('digest', '<absent>')[:12] for k in bad]}). Restore the files it was "
                f"trained with, or start in a new --workdir (the checkpoint is left as it is).")
