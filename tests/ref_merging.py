"""Slow, loop-based NumPy references for the merging ops, written from the algorithm descriptions.

Each function handles ONE example (no batch axis) and follows the reference code's steps literally
(ToMe ``tome/merge.py`` at af95e4b, PiToMe ``algo/pitome/merge.py`` at 550b5de), with Python loops over
tokens and float64 arithmetic. Three documented deviations of the JAX port are applied here too, so the
comparison is exact rather than approximate:

* cosine normalisation divides by ``max(norm, 1e-12)`` (ToMe divides by the raw norm -> NaN);
* a NaN similarity is treated as ``-inf``;
* every descending sort is stable (Python's ``sorted`` is stable; PyTorch's default argsort is not).

A "plan" is ``(assign, anchor)``: ``assign[t]`` = output slot of input token ``t`` (``-1`` dropped),
``anchor[k]`` = the input token representing output slot ``k``.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-12


def unit(v):
    v = np.asarray(v, np.float64)
    n = math.sqrt(sum(float(c) * float(c) for c in v))
    return v / max(n, EPS)


def cos(u, v):
    """Cosine similarity of two raw vectors (eps-safe); NaN -> -inf."""
    s = float(np.dot(unit(u), unit(v)))
    return -math.inf if math.isnan(s) else s


def stable_desc(values):
    """Indices sorting ``values`` descending; ties keep index order; NaN counts as -inf."""
    key = [(-math.inf if math.isnan(float(v)) else float(v)) for v in values]
    return sorted(range(len(key)), key=lambda i: -key[i])


def first_argmax(row):
    best, arg = -math.inf, 0
    for j, v in enumerate(row):
        if v > best:
            best, arg = v, j
    return arg


def plan_from_layout(num_in, layout):
    """``layout``: list over output slots of ``(anchor, members)`` -> ``(assign, anchor)`` arrays."""
    assign = np.full(num_in, -1, np.int64)
    anchor = np.zeros(len(layout), np.int64)
    for k, (a, members) in enumerate(layout):
        anchor[k] = a
        for t in members:
            assign[t] = k
    return assign, anchor


def merge_plan(x, sizes, assign, num_out):
    """Size-weighted merge of one example by loops: ``x: [T, C], sizes: [T] -> ([K, C], [K])``."""
    x = np.asarray(x, np.float64)
    mass = np.zeros((num_out, x.shape[1]))
    size = np.zeros(num_out)
    for t in range(x.shape[0]):
        k = assign[t]
        if k < 0:
            continue
        mass[k] += sizes[t] * x[t]
        size[k] += sizes[t]
    return mass / size[:, None], size


# -- ToMe -------------------------------------------------------------------------------------------------


def tome_plan(metric, r, class_token=False, distill_token=False):
    """ToMe's ``bipartite_soft_matching`` for one example. Returns a dict with the reference's internal
    indices (``unm_idx``, ``src_idx``, ``dst_idx``, ``r``) and the plan (``assign``, ``anchor``)."""
    t = len(metric)
    protected = int(class_token) + int(distill_token)
    r = min(r, (t - protected) // 2)
    if r <= 0:
        ident = np.arange(t)
        return dict(r=0, assign=ident, anchor=ident)
    a_tok = list(range(0, t, 2))
    b_tok = list(range(1, t, 2))
    scores = [[cos(metric[i], metric[j]) for j in b_tok] for i in a_tok]
    if class_token:
        scores[0] = [-math.inf] * len(b_tok)
    if distill_token:
        for row in scores:
            row[0] = -math.inf
    node_max = [max(row) for row in scores]
    node_idx = [first_argmax(row) for row in scores]
    edge = stable_desc(node_max)
    if class_token:   # the class token ranks last, also below rows left at -inf by NaN
        edge = [i for i in edge if i != 0] + [0]
    src_idx, unm_idx = edge[:r], edge[r:]
    if class_token:
        unm_idx = sorted(unm_idx)
    dst_idx = [node_idx[i] for i in src_idx]
    # Output layout [unm, B], with the distillation reorder [unm0, B0, unm1.., B1..].
    unm_slots = [(2 * i, [2 * i]) for i in unm_idx]
    b_slots = [(b_tok[j], [b_tok[j]]) for j in range(len(b_tok))]
    for i, j in zip(src_idx, dst_idx):
        b_slots[j][1].append(2 * i)
    layout = unm_slots + b_slots
    if distill_token:
        layout = [unm_slots[0], b_slots[0]] + unm_slots[1:] + b_slots[1:]
    assign, anchor = plan_from_layout(t, layout)
    return dict(r=r, unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx, assign=assign, anchor=anchor,
                distill=distill_token)


def tome_scatter_merge(values, plan):
    """ToMe's ``merge(x, mode="sum")`` closure by loops: ``values: [T, ...]`` -> ``[T - r, ...]``."""
    values = np.asarray(values, np.float64)
    if plan["r"] == 0:
        return values.copy()
    a, b = values[0::2], values[1::2]
    unm = [a[i] for i in plan["unm_idx"]]
    dst = [row.copy() for row in b]
    for i, j in zip(plan["src_idx"], plan["dst_idx"]):
        dst[j] = dst[j] + a[i]
    if plan["distill"]:
        out = [unm[0], dst[0]] + unm[1:] + dst[1:]
    else:
        out = unm + dst
    return np.stack(out)


def tome_scatter_amax(values, plan):
    """``merge(source, mode="amax")`` by loops (for ToMe's ``merge_source``)."""
    values = np.asarray(values, np.float64)
    if plan["r"] == 0:
        return values.copy()
    a, b = values[0::2], values[1::2]
    unm = [a[i] for i in plan["unm_idx"]]
    dst = [row.copy() for row in b]
    for i, j in zip(plan["src_idx"], plan["dst_idx"]):
        dst[j] = np.maximum(dst[j], a[i])
    out = [unm[0], dst[0]] + unm[1:] + dst[1:] if plan["distill"] else unm + dst
    return np.stack(out)


def tome_merge_wavg(x, sizes, plan):
    """ToMe's ``merge_wavg``: ``x' = merge(x * s, sum) / merge(s, sum)``, ``s' = merge(s, sum)``."""
    s = np.asarray(sizes, np.float64)[:, None]
    mass = tome_scatter_merge(np.asarray(x, np.float64) * s, plan)
    size = tome_scatter_merge(s, plan)
    return mass / size, size[:, 0]


def tome_unmerge(y, plan, num_tokens):
    """ToMe's ``unmerge`` closure: splits ``y`` as ``[unm, dst]`` and scatters back to parity positions.
    It ignores the distillation reorder (the reference's bug with ``distill_token=True``)."""
    y = np.asarray(y, np.float64)
    n_unm = len(plan["unm_idx"])
    unm, dst = y[:n_unm], y[n_unm:]
    out = np.zeros((num_tokens,) + y.shape[1:])
    for j in range(len(dst)):
        out[2 * j + 1] = dst[j]
    for k, i in enumerate(plan["unm_idx"]):
        out[2 * i] = unm[k]
    for i, j in zip(plan["src_idx"], plan["dst_idx"]):
        out[2 * i] = dst[j]
    return out


def kth_plan(metric, k):
    """``kth_bipartite_soft_matching``: groups of ``k``; last of each group is B; every A merges; tail
    tokens beyond ``(T // k) * k`` are dropped."""
    t = len(metric)
    if k <= 1:
        ident = np.arange(t)
        return ident, ident
    groups = t // k
    b_tok = [g * k + k - 1 for g in range(groups)]
    layout = [(b, [b]) for b in b_tok]
    for g in range(groups):
        for q in range(k - 1):
            i = g * k + q
            j = first_argmax([cos(metric[i], metric[b]) for b in b_tok])
            layout[j][1].append(i)
    return plan_from_layout(t, layout)


def random_plan(metric, r, perm, class_token=False):
    """``random_bipartite_soft_matching`` with an injected permutation ``perm`` of the non-protected
    tokens: first ``r`` are A, the rest B (output order), every A merges into its best B."""
    t = len(metric)
    p = int(class_token)
    src, dst = list(perm[:r]), list(perm[r:])
    layout = [(i, [i]) for i in range(p)] + [(d, [d]) for d in dst]
    for i in src:
        j = first_argmax([cos(metric[i], metric[d]) for d in dst])
        layout[p + j][1].append(i)
    return plan_from_layout(t, layout)


# -- PiToMe -----------------------------------------------------------------------------------------------


def f_m(x, margin, alpha, energy_fn):
    """Paper Eq. 4 (``x`` above the margin) or the released code's ``ELU(x - m, alpha)``."""
    if x >= margin:
        return x if energy_fn == "paper" else x - margin
    return alpha * (math.exp(x - margin) - 1.0)


def pitome_energy(metric, margin, alpha, energy_fn):
    n = len(metric)
    sim = [[cos(metric[i], metric[j]) for j in range(n)] for i in range(n)]
    return [sum(f_m(sim[i][j], margin, alpha, energy_fn) for j in range(n)) / n for i in range(n)], sim


def pitome_plan(metric, ratio, margin, alpha=1.0, energy_fn="paper", num_protected=1, use_bsm=False):
    """PiToMe for one example (``pitome`` or ``pitome_bsm`` path) -> ``(assign, anchor)``."""
    t = len(metric)
    p = num_protected
    n = t - p
    r = int(math.floor(n - n * ratio))
    if r == 0:
        ident = np.arange(t)
        return ident, ident
    energy, sim = pitome_energy(metric[p:], margin, alpha, energy_fn)
    order = stable_desc(energy)
    front = [(i, [i]) for i in range(p)]
    if use_bsm:
        a, b = order[0::2], order[1::2]
        scores = [[sim[i][j] for j in b] for i in a]
        node_max = [max(row) for row in scores]
        edge = stable_desc(node_max)
        src, unm = edge[:r], edge[r:]
        b_slots = [(p + j, [p + j]) for j in b]
        for e in src:
            b_slots[first_argmax(scores[e])][1].append(p + a[e])
        layout = front + [(p + a[e], [p + a[e]]) for e in unm] + b_slots
    else:
        merge, prot = order[: 2 * r], order[2 * r :]
        a, b = merge[0::2], merge[1::2]
        b_slots = [(p + j, [p + j]) for j in b]
        for i in a:
            b_slots[first_argmax([sim[i][j] for j in b])][1].append(p + i)
        layout = front + [(p + i, [p + i]) for i in prot] + b_slots
    return plan_from_layout(t, layout)


# -- attention ----------------------------------------------------------------------------------------------


def attention_loop(q, k, v, bias=None):
    """Single-head attention by loops: ``q: [Tq, D], k, v: [Tk, D], bias: [Tk]`` -> ``[Tq, D]``."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.zeros_like(q)
    for i in range(len(q)):
        logits = [float(np.dot(q[i], k[j])) / math.sqrt(q.shape[1]) + (0.0 if bias is None else float(bias[j]))
                  for j in range(len(k))]
        mx = max(logits)
        w = [math.exp(z - mx) for z in logits]
        tot = sum(w)
        for j in range(len(k)):
            out[i] += w[j] / tot * v[j]
    return out
