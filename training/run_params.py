"""Parameters of a ``train.py`` run, read back into a model (shared by ``train.py`` and the evaluation).

``train.py`` saves ``{"params", "rest", "opt", "step"}`` with Orbax under ``<workdir>/checkpoints``. An nnx
state restores as nested dicts whose leaves sit under a trailing ``value`` key (``blocks/0/attn/qkv/kernel/
value``); the readers here drop that suffix so the keys match the model's parameter paths.
"""

from __future__ import annotations

import pathlib
from typing import Optional

import jax
import jax.numpy as jnp


def checkpoint_dir(workdir) -> pathlib.Path:
    """``<workdir>/checkpoints`` when it exists, else ``workdir`` itself (a checkpoints folder given directly)."""
    d = pathlib.Path(workdir)
    return d / "checkpoints" if (d / "checkpoints").is_dir() else d


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flat_paths(tree) -> dict:
    """``{"a/b/c": leaf}`` for every leaf of a pytree (dict keys, attribute names and indices joined by ``/``)."""
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def latest_run_params(workdir) -> tuple[pathlib.Path, Optional[int], dict]:
    """``(checkpoint dir, latest step, {parameter path: array})``; the step is ``None`` (and the dict empty)
    when the folder holds no checkpoint."""
    import orbax.checkpoint as ocp

    d = checkpoint_dir(workdir)
    mgr = ocp.CheckpointManager(d.resolve(), item_names=("state", "data_iter", "meta"),
                                item_handlers={"state": ocp.StandardCheckpointHandler()})
    step = mgr.latest_step()
    if step is None:
        return d, None, {}
    # onto this process's first device, whatever mesh (devices, processes) wrote the checkpoint
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    tree = mgr.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=one), tree)
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]["params"]
    src = {k[: -len("/value")] if k.endswith("/value") else k: v for k, v in flat_paths(restored).items()}
    return d, step, src


def copy_matching_params(model, src: dict) -> list[str]:
    """Copy ``src[path]`` into every parameter of ``model`` whose path is present with the same shape (cast to
    the parameter's dtype). Returns the paths left untouched (absent from ``src`` or of another shape)."""
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    skipped = []
    for path, var in flat:
        key = "/".join(str(k) for k in path)
        if key in src and tuple(src[key].shape) == tuple(var[...].shape):
            var[...] = jnp.asarray(src[key], var[...].dtype)
        else:
            skipped.append(key)
    if len(skipped) < len(flat):
        nnx.update(model, nnx.from_flat_state(flat))
    return skipped


__all__ = ["checkpoint_dir", "flat_paths", "latest_run_params", "copy_matching_params"]
