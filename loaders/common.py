"""Shared pieces of the checkpoint loaders: key reports, shape checks, writing into an NNX model.

A loader turns a foreign checkpoint into a flat ``{our_param_path: numpy array}`` dict (paths such as
``"blocks.3.attn.qkv.kernel"``), then :func:`assign_params` checks every shape against the model and writes
the values in. Checkpoint keys that were not used are *unexpected*; model parameters that received nothing
are *missing*; keys a format carries but inference never uses (e.g. HF's ``mask_token``) are *skipped*.

Large checkpoints use :func:`materialize` instead: the model is built abstractly (``nnx.eval_shape``), and
each parameter is filled from a stream of converted tensors straight onto the device(s), in the requested
dtype and optionally sharded over a mesh, so no random model and no full host copy of the weights exist.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np
from flax import nnx


class LoadError(ValueError):
    """A checkpoint cannot be loaded: missing or unexpected keys under a strict load, or a file this
    loader does not support (wrong architecture, unknown tensor type)."""


@dataclasses.dataclass
class LoadReport:
    """What a loader did. ``print(report)`` gives a readable summary."""

    source: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No missing and no unexpected keys."""
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        lines = [f"LoadReport({self.source}): {len(self.loaded)} parameters loaded, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.skipped)} skipped"]
        for name in ("missing", "unexpected", "skipped"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... (+{len(keys) - 20})" if len(keys) > 20 else "")
                lines.append(f"  {name}: {shown}")
        return "\n".join(lines)

    def raise_if_strict(self, strict: bool) -> None:
        if strict and not self.ok:
            raise LoadError(f"strict load failed:\n{self}")


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (str(k),))
    else:
        yield ".".join(prefix), tree


def model_params(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of every ``nnx.Param`` in the model (paths joined with dots)."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {k: tuple(np.shape(v)) for k, v in _flatten(pure)}


def check_shape(key: str, value: np.ndarray, expected: tuple[int, ...], *, source_key: str | None = None) -> None:
    """Raise ``ValueError`` naming the key and both shapes unless ``value.shape == expected``."""
    if tuple(value.shape) != tuple(expected):
        name = f"{source_key!r} -> {key!r}" if source_key else repr(key)
        raise ValueError(f"shape mismatch for {name}: checkpoint has {tuple(value.shape)}, "
                         f"model expects {tuple(expected)}")


def assign_params(model: nnx.Module, params: Mapping[str, np.ndarray], report: LoadReport, *,
                  origin: Mapping[str, str] | None = None, strict: bool = True) -> LoadReport:
    """Write ``params`` (``{our path: array}``) into ``model`` in place.

    Shapes are checked first (a mismatch raises ``ValueError`` naming both keys and shapes); paths the model
    does not have go to ``report.unexpected``; model parameters absent from ``params`` go to
    ``report.missing``. With ``strict`` the load raises :class:`LoadError` unless both lists are empty
    (nothing is written in that case). For loads that should not build a random model first, or that place
    parameters in another dtype or over a mesh, see :func:`materialize`.
    """
    origin = origin or {}
    target = model_params(model)
    for key, value in params.items():
        if key not in target:
            report.unexpected.append(origin.get(key, key))
            continue
        check_shape(key, np.asarray(value), target[key], source_key=origin.get(key))
    report.missing.extend(k for k in target if k not in params)
    report.raise_if_strict(strict)

    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    for key, value in params.items():
        if key not in target:
            continue
        node = pure
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[int(part)] if part not in node and part.isdigit() and int(part) in node else node[part]
        leaf_key = int(leaf) if leaf not in node and leaf.isdigit() else leaf
        node[leaf_key] = np.asarray(value, dtype=np.asarray(node[leaf_key]).dtype)
        report.loaded.append(key)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return report


class KeyTracker:
    """Reads a source state dict and remembers which keys were consumed (the rest are unexpected)."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self.tensors = dict(tensors)
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise KeyError(key)
        self.used.add(key)
        return np.asarray(self.tensors[key])

    def skip(self, key: str) -> bool:
        if key in self.tensors:
            self.used.add(key)
            return True
        return False

    def unused(self) -> list[str]:
        return sorted(k for k in self.tensors if k not in self.used)


def torch_linear(weight: np.ndarray) -> np.ndarray:
    """PyTorch ``Linear.weight [out, in]`` -> Flax kernel ``[in, out]``."""
    return np.ascontiguousarray(np.asarray(weight).T)


def torch_conv(weight: np.ndarray) -> np.ndarray:
    """PyTorch ``Conv2d.weight [O, I, kh, kw]`` -> Flax kernel ``[kh, kw, I, O]``."""
    return np.ascontiguousarray(np.transpose(np.asarray(weight), (2, 3, 1, 0)))


def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file; a missing, empty, truncated or garbled file is a :class:`LoadError`
    naming the path (the library's own errors do not)."""
    import pathlib

    path = pathlib.Path(path)
    if not path.is_file():
        raise LoadError(f"no safetensors file at {str(path)!r}")
    if path.stat().st_size == 0:
        raise LoadError(f"{str(path)!r} is empty (0 bytes): not a safetensors file")
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises SafetensorError / OSError / ValueError for damaged files
        raise LoadError(f"cannot read safetensors file {str(path)!r} ({path.stat().st_size} bytes; truncated or "
                        f"damaged?): {type(err).__name__}: {err}") from err


def read_npz(path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file; a missing, empty, truncated or garbled file (or member) is a
    :class:`LoadError` naming the path."""
    import pathlib

    path = pathlib.Path(path)
    if not path.is_file():
        raise LoadError(f"no .npz file at {str(path)!r}")
    if path.stat().st_size == 0:
        raise LoadError(f"{str(path)!r} is empty (0 bytes): not an .npz file")
    try:
        with np.load(str(path), allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise LoadError(f"{str(path)!r} holds a single array, not an .npz archive of named arrays")
            out = {k: f[k] for k in f.files}
    except LoadError:
        raise
    except Exception as err:  # zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error...
        raise LoadError(f"cannot read .npz file {str(path)!r} ({path.stat().st_size} bytes; truncated or damaged?): "
                        f"{type(err).__name__}: {err}") from err
    if not out:
        raise LoadError(f"{str(path)!r} is an .npz archive with no arrays")
    return out


def strip_prefix(tensors: Mapping[str, np.ndarray], prefixes) -> dict[str, np.ndarray]:
    """Drop the first matching prefix (e.g. ``"vit."``) from every key that has one."""
    out = {}
    for k, v in tensors.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


__all__ = ["LoadReport", "LoadError", "KeyTracker", "model_params", "assign_params", "check_shape",
           "torch_linear", "torch_conv", "strip_prefix", "read_safetensors", "read_npz", "abstract_params", "default_sharding", "materialize",
           "place_params"]


def make_putter(src: "KeyTracker", out: dict, origin: dict):
    """``put(ours, theirs, fn=identity)``: if the checkpoint has key ``theirs``, store ``fn(value)`` as our
    parameter ``ours`` and remember where it came from (keys never read stay "unexpected")."""

    def put(ours, theirs, fn=lambda a: a):
        if theirs in src:
            out[ours] = fn(src.get(theirs))
            origin[ours] = theirs

    return put


# -- streaming a checkpoint onto devices -----------------------------------------------------------------


def abstract_params(model: nnx.Module) -> dict[str, nnx.Param]:
    """``{dotted path: nnx.Param}`` of a model, abstract (from ``nnx.eval_shape``) or concrete."""
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Param)}


def default_sharding(path: str, shape: tuple[int, ...], mesh):
    """How :func:`materialize` places one parameter on ``mesh`` (a ``jax.sharding.Mesh``).

    Matrices are split over the mesh's first axis along their output dimension: the last axis of a Linear
    ``kernel [in, out]``, the vocabulary axis of an ``embedding [V, C]``. A matrix whose dimension does not
    divide by that axis' size, and every vector (norm scales), is replicated on all devices.
    """
    from jax.sharding import NamedSharding, PartitionSpec as P

    axis = mesh.axis_names[0]
    size = mesh.shape[axis]
    spec = P()
    if len(shape) == 2:
        dim = 0 if path.endswith("embedding") else 1
        if shape[dim] % size == 0:
            spec = P(*(axis if i == dim else None for i in range(2)))
    return NamedSharding(mesh, spec)


def materialize(model: nnx.Module, tensors: Iterable[tuple[str, np.ndarray, str]], report: LoadReport, *,
                dtype=None, mesh=None, sharding_fn: Callable | None = None, strict: bool = True) -> nnx.Module:
    """Fill the parameters of an abstract model (``nnx.eval_shape(lambda: Model(cfg, rngs=...))``) from a stream.

    ``tensors`` yields ``(our dotted path, host array, source key)`` one at a time, already in our layout
    (e.g. a Linear ``kernel [in, out]``). Each is shape-checked (``ValueError`` naming both keys), cast to
    ``dtype`` (default: the parameter's own dtype) and moved to the device with ``jax.device_put``: onto the
    default device, or, with ``mesh``, with ``sharding_fn(path, shape, mesh)`` (default
    :func:`default_sharding`). The host copy is dropped before the next tensor is read, so peak host memory is
    one tensor plus whatever the producer holds. Paths the model lacks go to ``report.unexpected`` (by source
    key); parameters left unfilled go to ``report.missing``, and with ``strict`` a non-empty list raises
    :class:`LoadError` (without ``strict`` they are filled with zeros). Returns ``model``, every parameter now a
    device array (``report.loaded`` lists those filled from the stream).
    """
    import jax

    target = abstract_params(model)
    sharding_fn = sharding_fn or default_sharding
    filled: set[str] = set()
    for path, value, source in tensors:
        param = target.get(path)
        if param is None:
            report.unexpected.append(source)
            continue
        want = param.get_value()
        check_shape(path, value, tuple(want.shape), source_key=source)
        value = np.asarray(value, dtype=np.dtype(dtype or want.dtype))
        placement = sharding_fn(path, value.shape, mesh) if mesh is not None else None
        param.set_value(jax.device_put(value, placement))
        del value
        filled.add(path)
        report.loaded.append(path)
    report.missing.extend(k for k in target if k not in filled)
    report.raise_if_strict(strict)
    for path in report.missing:  # a non-strict load leaves no abstract leaf behind: the gaps become zeros
        want = target[path].get_value()
        zeros = np.zeros(want.shape, np.dtype(dtype or want.dtype))
        placement = sharding_fn(path, zeros.shape, mesh) if mesh is not None else None
        target[path].set_value(jax.device_put(zeros, placement))
    return model


def place_params(model: nnx.Module, *, dtype=None, mesh=None, sharding_fn: Callable | None = None) -> nnx.Module:
    """Move every ``nnx.Param`` of a built model onto the device(s) as a JAX array, floating-point ones cast to
    ``dtype`` (``None`` keeps each parameter's dtype); with ``mesh`` each is placed with
    ``sharding_fn(path, shape, mesh)`` (default :func:`default_sharding`). For loaders that fill a concrete model
    with host arrays (:func:`assign_params`), so their parameters land like :func:`materialize`'s: on the device,
    in the requested dtype. Returns ``model``."""
    import jax
    import jax.numpy as jnp

    sharding_fn = sharding_fn or default_sharding
    for path, param in abstract_params(model).items():
        value = param.get_value()
        want = np.dtype(dtype) if (dtype is not None and jnp.issubdtype(value.dtype, jnp.floating)) else value.dtype
        placement = sharding_fn(path, tuple(value.shape), mesh) if mesh is not None else None
        param.set_value(jax.device_put(jnp.asarray(value, want), placement))
    return model
