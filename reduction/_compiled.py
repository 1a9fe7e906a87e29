"""Eager calls of the public ops compile once per static configuration and shape.

Called outside a ``jax.jit``, a JAX function runs primitive by primitive: each op is dispatched (and on first
sight compiled) on its own, which made ToMe's merge about 30x slower eagerly than jitted. :func:`eager_jit`
wraps a public op so that an eager call runs one compiled program instead:

* the arguments are flattened as a pytree (:class:`~reduction.state.TokenState`,
  :class:`~reduction.step.ReductionStep` and :class:`~reduction.reducers.LayerInfo` are pytrees); array leaves
  (``jax.Array``, ``numpy.ndarray``) are the traced inputs, every other leaf (Python ints such as ``r`` or
  ``keep``, floats, strings, flags, callables, a frozen ``Reducer``) is static and part of the cache key, with
  its type (so ``r=1`` and ``r=True`` stay distinct and ``True`` still gets its named error);
* one ``jax.jit`` per static configuration and input shapes and dtypes, cached here (at most 256 per op), so a
  second call with new data of the same shape runs the compiled program without tracing again;
* shape and type checks run while tracing, so a bad argument raises its named ``ValueError`` before anything is
  compiled; checks that read values (image spans that run outside the sequence) are given as ``check``, which
  runs on the concrete arguments before every eager call; warnings raised while tracing are recorded and
  repeated on every later call of the same program, as the uncompiled op would raise them;
* when any array argument is a tracer (the op is called inside a user's ``jax.jit``, ``vmap``, ``grad`` or
  ``lax.scan``) the wrapper calls the function directly: the jaxpr is exactly the unwrapped one, nothing is
  nested and nothing is cached;
* a static leaf that cannot be hashed (a list inside a frozen dataclass, say) makes that call run eagerly as
  before, correct but slow.

``trace_count(fn)`` returns how many times the wrapped ``fn`` has been traced for eager calls (the tests check
that new data of the same shape does not trace again). ``eager_jit_disabled()`` is a context manager that makes
every wrapped op run un-jitted (the old primitive-by-primitive behaviour), for debugging with prints; the
environment variable ``TOKENREDUCE_EAGER_JIT=0`` does the same for the whole process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from typing import Any, Callable, Optional

import jax
import numpy as np

_MAX_CONFIGS = 256          # per op; a caller that makes a new lambda per call must not grow the cache forever
_state = threading.local()


def _is_dynamic(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


_DEFAULT_DISABLED = os.environ.get("TOKENREDUCE_EAGER_JIT", "1") == "0"


def _enabled() -> bool:
    return not getattr(_state, "disabled", _DEFAULT_DISABLED)


@contextlib.contextmanager
def eager_jit_disabled():
    """Inside this context every :func:`eager_jit` op runs un-jitted, primitive by primitive."""
    before = getattr(_state, "disabled", _DEFAULT_DISABLED)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = before


def eager_jit(fn: Optional[Callable] = None, *, check: Optional[Callable[..., None]] = None):
    """Decorator: ``fn`` runs as one compiled program when called eagerly, and unchanged under a trace.

    ``check(*args, **kwargs)`` (optional) runs on the concrete arguments before every eager call, for checks that
    read values rather than shapes; it is not run under a trace (the function's own traced handling applies).
    """
    if fn is None:
        return functools.partial(eager_jit, check=check)
    configs: dict = {}
    counter = [0]

    def build(treedef, dyn_pos, static):
        static_values = [value for _, value in static]

        def run(*dyn):
            counter[0] += 1
            leaves = list(static_values)
            for pos, value in zip(dyn_pos, dyn):
                leaves.insert(pos, value)
            args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
            return fn(*args, **kwargs)

        return jax.jit(run)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        if not _enabled() or any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return fn(*args, **kwargs)
        if check is not None:
            check(*args, **kwargs)
        dyn_pos, dyn, avals, static = [], [], [], []
        for i, leaf in enumerate(leaves):
            if _is_dynamic(leaf):
                dyn_pos.append(i)
                dyn.append(leaf)
                avals.append((leaf.shape, leaf.dtype, getattr(leaf, "weak_type", False)))
            else:
                static.append((type(leaf), leaf))
        key = (treedef, tuple(dyn_pos), tuple(static), tuple(avals))
        try:
            entry = configs.get(key)
        except TypeError:                                     # an unhashable static leaf: run eagerly
            return fn(*args, **kwargs)
        if entry is None:
            # A new configuration or shape: trace and compile now, recording the warnings the trace raises so
            # that every later call of this entry repeats them (an eager call would have raised them each time).
            if len(configs) >= _MAX_CONFIGS:
                configs.clear()
            compiled = build(treedef, tuple(dyn_pos), tuple(static))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = compiled(*dyn)
            entry = configs[key] = (compiled, tuple(caught), {})
        else:
            out = entry[0](*dyn)
        for w in entry[1]:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=entry[2])
        return out

    wrapper._eager_traces = counter                           # type: ignore[attr-defined]
    wrapper._eager_configs = configs                          # type: ignore[attr-defined]
    return wrapper


def trace_count(fn: Callable) -> int:
    """How many times the :func:`eager_jit` op ``fn`` (a function or a ``Reducer`` class's ``__call__``) has been
    traced for eager calls."""
    fn = getattr(fn, "__func__", fn)
    return fn._eager_traces[0]


def clear_cache(fn: Callable) -> None:
    """Forget the compiled programs of one :func:`eager_jit` op (the next eager call traces again)."""
    fn = getattr(fn, "__func__", fn)
    fn._eager_configs.clear()


__all__ = ["eager_jit", "eager_jit_disabled", "trace_count", "clear_cache"]
