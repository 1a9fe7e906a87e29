"""Per-setting measurements: one compiled executable gives features, XLA's FLOP count and timings.

A setting is compiled once for a fixed batch ``[B, S, S, 3]``; the same executable then
* reports ``cost_analysis()["flops"]`` (divided by B: FLOPs per image, XLA counts 2 x MACs for dots and
  one FLOP per element for elementwise ops),
* extracts features for a whole image set (the last batch padded, padding rows dropped),
* is timed: ``warmup`` calls, then the median of ``repeats`` timed calls, each ending in
  ``block_until_ready``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evaluation.data import IMAGENET_MEAN, IMAGENET_STD, batches, to_rgb

# (params, images [B, S, S, 3], reducers, rng) -> [B, F]; params are passed as an argument (not baked in as
# constants) so compilation stays fast and XLA sees the same program as a training-time forward.
FeatureFn = Callable[[Any, jax.Array, tuple, jax.Array], jax.Array]


@dataclasses.dataclass
class Compiled:
    """A feature function compiled for one reducer setting and one batch shape."""

    fn: Callable[[jax.Array, jax.Array], jax.Array]
    batch_size: int
    image_size: int
    compile_s: float
    xla_flops_per_image: Optional[float]
    mean: tuple = tuple(IMAGENET_MEAN)
    std: tuple = tuple(IMAGENET_STD)


def xla_flops(compiled) -> Optional[float]:
    """``cost_analysis()["flops"]`` of a compiled executable (``None`` if the backend gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def compile_setting(features: FeatureFn, reducers: Sequence, *, batch_size: int, image_size: int,
                    params: Any = None, mean=tuple(IMAGENET_MEAN), std=tuple(IMAGENET_STD)) -> Compiled:
    """``jax.jit(features).lower(...).compile()`` with the reducers closed over (static) and ``params``
    passed as an argument. ``Compiled.fn(images, rng)`` runs it with those params."""
    reducers = tuple(reducers)

    def run(p, images, rng):
        return features(p, images, reducers, rng)

    start = time.perf_counter()
    lowered = jax.jit(run).lower(
        params,
        jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32),
        jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    compiled = lowered.compile()
    elapsed = time.perf_counter() - start
    total = xla_flops(compiled)

    def fn(images, rng):
        return compiled(params, images, rng)

    return Compiled(fn=fn, batch_size=batch_size, image_size=image_size, compile_s=elapsed,
                    xla_flops_per_image=None if total is None else total / batch_size,
                    mean=tuple(float(v) for v in np.ravel(mean)), std=tuple(float(v) for v in np.ravel(std)))


_to_rgb = jax.jit(to_rgb, static_argnums=(1, 2, 3))


def extract(compiled: Compiled, images: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Features ``[B_total, F]`` of ``uint8`` images, batch by batch. Batch ``i`` gets the PRNG key
    ``fold_in(PRNGKey(seed), i)`` (used by stochastic reducers only), so results are reproducible."""
    out = []
    b = compiled.batch_size
    key = jax.random.PRNGKey(seed)
    for i, (start, stop) in enumerate(batches(len(images), b)):
        chunk = np.asarray(images[start:stop])
        if stop - start < b:
            pad = np.zeros((b - (stop - start),) + chunk.shape[1:], chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        x = _to_rgb(chunk, compiled.image_size, compiled.mean, compiled.std)
        feats = compiled.fn(x, jax.random.fold_in(key, i))
        out.append(np.asarray(feats)[: stop - start])
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class Timing:
    images_per_s: float
    median_batch_s: float
    batch_size: int
    repeats: int


def throughput(compiled: Compiled, images: np.ndarray, *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Images per second of the compiled model on one batch (the first ``batch_size`` images, cycled if
    fewer): ``warmup`` untimed calls, then the median of ``repeats`` timed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    b = compiled.batch_size
    idx = np.arange(b) % len(images)
    x = jax.block_until_ready(_to_rgb(np.asarray(images)[idx], compiled.image_size, compiled.mean, compiled.std))
    key = jax.random.PRNGKey(0)
    for _ in range(warmup):
        jax.block_until_ready(compiled.fn(x, key))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled.fn(x, key))
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    return Timing(images_per_s=b / med, median_batch_s=med, batch_size=b, repeats=repeats)
