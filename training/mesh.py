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
    ``"on"``: always; ``"off"``: never. Must run before any other JAX call.

    Outside a detected cluster (e.g. several processes on one machine) ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
    give ``num_processes`` / ``process_id``; on CPU the processes talk through gloo (JAX's default
    ``jax_cpu_collectives_implementation``)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"mesh.distributed must be 'auto', 'on' or 'off', got {mode!r}")
    wanted = mode == "on" or (mode == "auto" and (os.environ.get("JAX_COORDINATOR_ADDRESS")
                                                    or os.environ.get("JAX_MULTIHOST") == "1"))
    if wanted and not getattr(maybe_initialize_distributed, "_done", False):
        kwargs = {}
        for env, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
            if os.environ.get(env, "") != "":
                try:
                    kwargs[key] = int(os.environ[env])
                except ValueError:
                    raise ValueError(f"{env}={os.environ[env]!r} must be an integer") from None
        jax.distributed.initialize(**kwargs)
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


def put_global(tree, shardings):
    """``jax.device_put(tree, shardings)`` that also works when the mesh spans several processes: every process
    holds the same host value of each leaf (same seed, same checkpoint source), and each builds the global array
    from it with :func:`jax.make_array_from_callback` (its own shards only). Typed PRNG keys go through their key
    data."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    import numpy as np

    def one(x, sharding):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            data = one(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=impl)
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)
