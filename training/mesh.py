"""Devices: ``jax.distributed`` start-up, the ``"data"`` mesh, replicated or FSDP state shardings."""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax




log = logging.getLogger("tokenreduce.train")


# -- distribution -------------------------------------------------------------------------------------------


def maybe_initialize_distributed(mode: str) -> None:
    """``"auto"``: call :func:`jax.distributed.initialize` when a coordinator is configured in the
    environment (``JAX_COORDINATOR_ADDRESS``, or a cluster such as SLURM/TPU pods via ``JAX_MULTIHOST=1``);
    ``"on"``: always; ``"off"``: never. Must run before any other JAX call."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"mesh.distributed must be 'auto', 'on' or 'off', got {mode!r}")
    wanted = mode == "on" or (mode == "auto" and (os.environ.get("JAX_COORDINATOR_ADDRESS")
                                                    or os.environ.get("JAX_MULTIHOST") == "1"))
    if wanted and not getattr(maybe_initialize_distributed, "_done", False):
        jax.distributed.initialize()
        maybe_initialize_distributed._done = True


def make_mesh(num_devices: Optional[int] = None) -> jax.sharding.Mesh:
    """One 1-D mesh ``("data",)`` over all devices (or the first ``num_devices``), Auto axis type so
    GSPMD propagates shardings through the model code."""
    devices = jax.devices()
    n = len(devices) if not num_devices else int(num_devices)
    if n > len(devices):
        raise ValueError(f"mesh.num_devices={n} but only {len(devices)} devices are visible")
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


def state_shardings(state, mesh, *, fsdp: bool, min_fsdp_size: int = 2 ** 14):
    """Replicated shardings, or FSDP: each leaf with ``>= min_fsdp_size`` elements is split on ``"data"``
    along its largest dimension divisible by the mesh size (others stay replicated)."""
    P = jax.sharding.PartitionSpec
    n = mesh.shape["data"]

    def one(x):
        if not fsdp or n == 1 or x.ndim == 0 or x.size < min_fsdp_size:
            return jax.sharding.NamedSharding(mesh, P())
        dims = sorted(range(x.ndim), key=lambda d: -x.shape[d])
        for d in dims:
            if x.shape[d] % n == 0:
                spec = [None] * x.ndim
                spec[d] = "data"
                return jax.sharding.NamedSharding(mesh, P(*spec))
        return jax.sharding.NamedSharding(mesh, P())

    return jax.tree.map(one, state)
