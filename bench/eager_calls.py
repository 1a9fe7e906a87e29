"""Eager-call columns shared by the op benchmarks: each public op called outside any ``jax.jit``, against the same
call jitted by the user.

For every case ``name -> (call, args)`` (``call`` calls one public op on concrete arrays, its counts static):

* ``first_call_s``: the first eager call in this process (trace + compile + run, ``reduction._compiled``), next to
  ``jitted_first_call_s``, the first call of the same call under the user's ``jax.jit`` (the same compile), and
  the process CPU seconds of both (``*_cpu_s``: steadier than wall time on a shared machine);
* ``eager_warm_ms`` and ``jitted_ms``: medians of interleaved calls (eager, jitted, eager, ...) with
  ``block_until_ready``; ``warm_ratio`` is the median over rounds of ``eager_i / jitted_i`` (target <= 3);
* ``uncompiled_*`` (with ``uncompiled=True``; slow): the same op with ``eager_jit_disabled()``, primitive by primitive
  as every eager call ran before; its first call depends on which primitives earlier cases already compiled.

The first call is only a first call if nothing in the process called the op eagerly before with the same static
arguments and shapes; calls traced inside a ``jax.jit`` do not count (they bypass the eager cache).
"""

from __future__ import annotations

import statistics
import time

import jax

from reduction._compiled import eager_jit_disabled

TARGET_WARM_RATIO = 3.0
TARGET_FIRST_CALL_S = 1.0


def _time(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def _time_cpu(fn, args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time of a compile is the steadier
    figure (wall time stretches with the other processes' load)."""
    c0 = time.process_time()
    wall = _time(fn, args)
    return wall, time.process_time() - c0


def eager_columns(cases: dict, repeats: int, *, uncompiled: bool = False) -> dict:
    rows = {}
    for name, (call, args) in cases.items():
        first, first_cpu = _time_cpu(call, args)
        jitted = jax.jit(call)
        jit_first, jit_first_cpu = _time_cpu(jitted, args)
        for _ in range(2):
            _time(call, args), _time(jitted, args)
        eager_t, jit_t = [], []
        for _ in range(repeats):
            eager_t.append(_time(call, args))
            jit_t.append(_time(jitted, args))
        row = dict(first_call_s=first, first_call_cpu_s=first_cpu, jitted_first_call_s=jit_first,
                   jitted_first_call_cpu_s=jit_first_cpu, eager_warm_ms=statistics.median(eager_t) * 1e3,
                   jitted_ms=statistics.median(jit_t) * 1e3,
                   warm_ratio=statistics.median([e / j for e, j in zip(eager_t, jit_t)]))
        if uncompiled:
            with eager_jit_disabled():
                row["uncompiled_first_call_s"] = _time(call, args)
                plain = [_time(call, args) for _ in range(max(2, min(repeats, 5)))]
            row["uncompiled_warm_ms"] = statistics.median(plain) * 1e3
            row["uncompiled_ratio"] = row["uncompiled_warm_ms"] / row["jitted_ms"]
        rows[name] = row
    return rows


def report(rows: dict, title: str) -> dict:
    """Print the table and return the JSON block (rows, targets, which ops meet them)."""
    print(f"eager calls ({title}): first call, warm eager vs the same call jitted"
          + (", and uncompiled (primitive by primitive)" if rows and "uncompiled_warm_ms" in next(iter(rows.values()))
             else ""))
    for name, r in rows.items():
        line = (f"  {name:24s} first {r['first_call_s']:6.3f} s, CPU {r['first_call_cpu_s']:5.2f} s "
                f"(jitted {r['jitted_first_call_s']:6.3f} s, CPU {r['jitted_first_call_cpu_s']:5.2f} s)   "
                f"eager {r['eager_warm_ms']:8.3f} ms   jitted {r['jitted_ms']:8.3f} ms   "
                f"eager/jitted {r['warm_ratio']:5.2f}x")
        if "uncompiled_warm_ms" in r:
            line += (f"   uncompiled first {r['uncompiled_first_call_s']:6.3f} s, "
                     f"warm {r['uncompiled_warm_ms']:8.3f} ms ({r['uncompiled_ratio']:.1f}x)")
        print(line)
    slow_warm = [n for n, r in rows.items() if r["warm_ratio"] > TARGET_WARM_RATIO]
    slow_first = [n for n, r in rows.items() if r["first_call_s"] > TARGET_FIRST_CALL_S]
    print(f"  targets: warm <= {TARGET_WARM_RATIO:g}x jitted missed by {slow_warm or 'none'}; "
          f"first call < {TARGET_FIRST_CALL_S:g} s missed by {slow_first or 'none'}")
    return dict(ops=rows, target_warm_ratio_le=TARGET_WARM_RATIO, target_first_call_s_lt=TARGET_FIRST_CALL_S,
                missed_warm=slow_warm, missed_first_call=slow_first)
