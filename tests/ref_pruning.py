"""Slow, loop-based NumPy references for the pruning methods, written from the specs (not from the JAX code).

Every function works on ONE example with plain Python loops over tokens, heads and pivots, in float64,
and returns Python lists / NumPy arrays. Tie-breaking everywhere: lower index first.
"""

from __future__ import annotations

import math

import numpy as np


# -- shared ---------------------------------------------------------------------------------------------


def cos_torch(u, v, eps=1e-8):
    """torch.nn.functional.cosine_similarity for two vectors (each norm clamped at eps)."""
    nu = max(math.sqrt(float(np.dot(u, u))), eps)
    nv = max(math.sqrt(float(np.dot(v, v))), eps)
    return float(np.dot(u / nu, v / nv))


def top_desc(values, k, allowed=None):
    """Indices of the k largest values (ties: lower index), restricted to ``allowed``."""
    idx = [i for i in range(len(values)) if allowed is None or allowed[i]]
    return sorted(idx, key=lambda i: (-values[i], i))[:k]


# -- DART -----------------------------------------------------------------------------------------------


def dart_official_ref(h, k, start, image_len, max_num_trunction, nip=4, ntp=4):
    """The official DART selection (LLaVA path, ``get_retained_image_token``; batch 1, no padding) as plain loops.

    ``h: [T, C]`` final-norm hidden states, ``k: [T, Ck]`` keys of layer ``K - 1``; one image span at
    ``start``. Returns every kept position, sorted. Steps as in the official code:

    * ``TOKEN_TOPK = ceil(max_num_trunction // (nip + ntp))`` picks per pivot;
    * image pivots: the ``nip`` largest key L1 norms in the span, text pivots: the ``ntp`` largest after
      it, each list in descending order (ties: lower position, a choice: torch leaves them unspecified);
    * ``pivots = set(image_pivots + text_pivots)``, ``cands = set(span) - set(image_pivots)``;
    * for each pivot of ``list(pivots)`` (the set's iteration order, taken once before the loop): the
      ``TOKEN_TOPK`` candidates with the lowest cosine to the pivot join ``pivots`` and leave ``cands``
      (ties: lower position);
    * the kept image tokens are ``pivots`` minus the text pivots; every other token is kept.
    """
    h = np.asarray(h, np.float64)
    k = np.asarray(k, np.float64)
    t = h.shape[0]
    end = start + image_len
    topk = math.ceil(max_num_trunction // (nip + ntp))
    l1 = [float(np.sum(np.abs(k[i]))) for i in range(t)]
    image_piv = [start + j for j in top_desc(l1[start:end], nip)]
    text_piv = [end + j for j in top_desc(l1[end:], ntp)]
    pivots = set(image_piv + text_piv)
    cands = set(range(start, end)) - set(image_piv)
    for p in list(pivots):
        order = list(cands)
        sims = [cos_torch(h[p], h[c]) for c in order]
        ranked = sorted(range(len(order)), key=lambda j: (sims[j], order[j]))
        pick = [order[j] for j in ranked[:topk]]
        pivots.update(pick)
        cands.difference_update(pick)
    pivots.difference_update(text_piv)
    return sorted(set(range(start)) | pivots | set(range(end, t)))


def dart_ref(h, k, starts, image_len, budget, valid=None, positions=None, nip=4, ntp=4, source="keys",
             order="cpython_set"):
    """Kept slots (sorted) of one possibly padded sequence with images at slots ``starts``.

    The official selection of :func:`dart_official_ref` per image, generalised as the port documents:
    several images (text pivots among valid non-image slots after each image), invalid slots never pivots,
    per-pivot picks clamped to the candidates left, a missing text pivot scored as a zero vector, and
    the visit order taken on ``positions`` (position ids; default ``cumsum(valid) - 1``): ``"cpython_set"``
    iterates ``set(pivot position ids)`` like the official code, ``"ascending"`` sorts them. A missing
    pivot counts as position ``max valid position + 1 + its slot``.
    """
    h = np.asarray(h, np.float64)
    t = h.shape[0]
    src = np.asarray(k if source == "keys" else h, np.float64)
    l1 = [float(np.sum(np.abs(src[i]))) for i in range(t)]
    valid = [True] * t if valid is None else [bool(v) for v in valid]
    if positions is None:
        positions, seen = [], 0
        for i in range(t):
            seen += valid[i]
            positions.append(max(seen - 1, 0))
    positions = [max(int(p), 0) for p in positions]
    next_pos = max([positions[i] for i in range(t) if valid[i]], default=-1) + 1
    in_img = [any(s <= i < s + image_len for s in starts) for i in range(t)]
    npiv = nip + ntp
    topk = budget // npiv
    kept_all = set(i for i in range(t) if not in_img[i])
    for s in starts:
        span = list(range(s, s + image_len))
        if nip + npiv * topk >= image_len:
            kept_all.update(span)
            continue
        img_piv = [span[j] for j in top_desc([l1[p] for p in span], nip)]
        txt_ok = [valid[i] and not in_img[i] and i >= s + image_len for i in range(t)]
        txt_piv = top_desc(l1, ntp, txt_ok)
        slots = img_piv + txt_piv + [None] * (ntp - len(txt_piv))
        key_of = {}                                   # position id -> pivot slot (None: missing pivot)
        for j, p in enumerate(slots):
            key_of[next_pos + j if p is None else positions[p]] = p
        if order == "ascending":
            visit = [key_of[q] for q in sorted(key_of)]
        else:
            visit = [key_of[q] for q in list(set(list(key_of)))]   # set(list), as the official code
        cands = [p for p in span if p not in img_piv]
        keep = set(img_piv)
        for p in visit:
            hp = np.zeros(h.shape[1]) if p is None else h[p]
            sims = {c: cos_torch(hp, h[c]) for c in cands}
            n = min(topk, len(cands))
            pick = sorted(cands, key=lambda c: (sims[c], c))[:n]
            keep.update(pick)
            cands = [c for c in cands if c not in pick]
        kept_all.update(keep)
    return sorted(kept_all)


def dart_vit_ref(x, keep, num_protected=1, num_pivots=8, keys=None):
    x = np.asarray(x, np.float64)
    t = x.shape[0]
    src = x if keys is None else np.asarray(keys, np.float64)
    others = list(range(num_protected, t))
    pivots = min(num_pivots, keep - num_protected)
    rest = keep - num_protected - pivots
    per = rest // pivots
    counts = [per + rest - per * pivots] + [per] * (pivots - 1)
    l1 = [float(np.sum(np.abs(src[i]))) for i in others]
    piv = sorted(others[j] for j in top_desc(l1, pivots))
    cands = [i for i in others if i not in piv]
    kept = set(range(num_protected)) | set(piv)
    for p, n in zip(piv, counts):
        sims = {c: cos_torch(x[p], x[c]) for c in cands}
        pick = sorted(cands, key=lambda c: (sims[c], c))[:n]
        kept.update(pick)
        cands = [c for c in cands if c not in pick]
    return sorted(kept)


# -- FastV ----------------------------------------------------------------------------------------------


def fastv_ref(attn, starts, image_len, budget, valid=None):
    """``attn: [H, Tq, T]``; rows are the last Tq positions."""
    attn = np.asarray(attn, np.float64)
    nh, tq, t = attn.shape
    valid = [True] * t if valid is None else list(valid)
    rows = [r for r in range(tq) if valid[t - tq + r]]
    row = rows[-1] if rows else tq - 1
    score = [sum(attn[hh, row, j] for hh in range(nh)) / nh for j in range(t)]
    keep = set(j for j in range(t) if not any(s <= j < s + image_len for s in starts))
    for s in starts:
        span = list(range(s, s + image_len))
        keep.update(span[j] for j in top_desc([score[p] for p in span], min(budget, image_len)))
    return sorted(keep)


# -- top-k / random / pool --------------------------------------------------------------------------------


def topk_ref(scores, keep, num_protected=0, valid=None):
    t = len(scores)
    valid = [True] * t if valid is None else [bool(v) for v in valid]
    rest = sorted(range(num_protected, t), key=lambda i: (not valid[i], -scores[i], i))
    return sorted(list(range(num_protected)) + rest[: keep - num_protected])


def pool_ref(x, sizes, k, num_protected, h, w):
    """Size-weighted average pooling of the h x w grid after the protected tokens (ceil mode)."""
    x = np.asarray(x, np.float64)
    oh, ow = -(-h // k), -(-w // k)
    out_x, out_s = [x[i] for i in range(num_protected)], [sizes[i] for i in range(num_protected)]
    for i in range(oh):
        for j in range(ow):
            acc, tot = np.zeros(x.shape[1]), 0.0
            for r in range(i * k, min(h, i * k + k)):
                for c in range(j * k, min(w, j * k + k)):
                    t = num_protected + r * w + c
                    acc += sizes[t] * x[t]
                    tot += sizes[t]
            out_x.append(acc / tot)
            out_s.append(tot)
    return np.stack(out_x), np.asarray(out_s)


# -- Zero-TPrune ------------------------------------------------------------------------------------------


def wpr_ref(attn, mask, iterations, init="cls_boost", renormalize=True):
    """``attn: [H, T, T]`` -> ``[H, T]`` after ``iterations`` steps of s_j <- sum_i A_ij s_i."""
    attn = np.asarray(attn, np.float64)
    nh, t, _ = attn.shape
    a = np.zeros_like(attn)
    for hh in range(nh):
        for i in range(t):
            for j in range(t):
                if mask[i] and mask[j]:
                    a[hh, i, j] = attn[hh, i, j]
            if renormalize:
                row = sum(a[hh, i, :])
                if row > 0:
                    a[hh, i, :] /= row
    n = sum(bool(m) for m in mask)
    s0 = [1.0 if mask[i] else 0.0 for i in range(t)]
    if init == "cls_boost":
        s0[0] *= math.sqrt(n)
    tot = sum(s0)
    s0 = [v / tot for v in s0]
    out = np.zeros((nh, t))
    for hh in range(nh):
        s = list(s0)
        for _ in range(iterations):
            s = [sum(a[hh, i, j] * s[i] for i in range(t)) for j in range(t)]
        out[hh] = s
    return out


def eir_vhf_ref(s, mask, v_min=0.01, v_max=0.7, var_scale="num_tokens", fallback="all"):
    nh, t = s.shape
    idx = [i for i in range(t) if mask[i]]
    n = len(idx)
    scale = n if var_scale == "num_tokens" else 1.0
    var = []
    for hh in range(nh):
        z = [scale * s[hh, i] for i in idx]
        mu = sum(z) / n
        var.append(sum((v - mu) ** 2 for v in z) / n)
    eta = [1.0 if v_min <= v <= v_max else 0.0 for v in var]
    if sum(eta) == 0:
        eta = [1.0] * nh if fallback == "all" else [1.0 if hh == int(np.argmax(var)) else 0.0 for hh in range(nh)]
    out = []
    for i in range(t):
        if not mask[i]:
            out.append(-math.inf)
        else:
            out.append(math.sqrt(sum(eta[hh] * s[hh, i] ** 2 for hh in range(nh)) / sum(eta)))
    return out


def zerotprune_ref(attn, metric, r_s, r_i, num_protected=1, valid=None, iterations=10, preview_iterations=1,
                   init="cls_boost", v_min=0.01, v_max=0.7, var_scale="num_tokens", fallback="all",
                   renormalize=True):
    """Kept original indices (sorted) after I' -> S -> I for one example."""
    attn = np.asarray(attn, np.float64)
    metric = np.asarray(metric, np.float64)
    t = attn.shape[-1]
    valid = [True] * t if valid is None else [bool(v) for v in valid]
    agg = dict(v_min=v_min, v_max=v_max, var_scale=var_scale, fallback=fallback)
    survivors = list(range(t))
    if r_s > 0:
        imp = eir_vhf_ref(wpr_ref(attn, valid, preview_iterations, init, renormalize), valid, **agg)
        others = sorted(range(num_protected, t), key=lambda i: (-imp[i], i))
        n = len(others)
        n_a = n // 2
        group_b, group_a = others[: n - n_a], others[n - n_a:]
        best = {}
        for a in group_a:
            if not valid[a]:
                best[a] = math.inf
                continue
            sims = [cos_torch(metric[a], metric[b], eps=1e-12) for b in group_b if valid[b]]
            best[a] = max(sims) if sims else -math.inf
        ranked = sorted(group_a, key=lambda a: (-best[a], a))            # ties: lower position first
        drop = set(ranked[:r_s])
        survivors = [i for i in range(t) if i not in drop]
    if r_i > 0:
        sub = attn[:, survivors][:, :, survivors]
        sub_valid = [valid[i] for i in survivors]
        imp = eir_vhf_ref(wpr_ref(sub, sub_valid, iterations, init, renormalize), sub_valid, **agg)
        imp = [math.inf if j < num_protected else imp[j] for j in range(len(survivors))]
        order = sorted(range(len(survivors)), key=lambda j: (-imp[j], j))
        keep = sorted(order[: len(survivors) - r_i])
        survivors = [survivors[j] for j in keep]
    return survivors


# -- ATP ------------------------------------------------------------------------------------------------------


def received_ref(attn, weights, exclude_self=False):
    """``attn: [H, Tq, T]`` -> list ``[T]``."""
    attn = np.asarray(attn, np.float64)
    nh, tq, t = attn.shape
    out = []
    for j in range(t):
        acc = 0.0
        for q in range(tq):
            if exclude_self and q == j:
                continue
            acc += weights[q] * sum(attn[hh, q, j] for hh in range(nh)) / nh
        out.append(acc / max(sum(weights), 1e-30))
    return out


def redundancy_ref(self_r, cross_r, cand, self_weight=0.5):
    ms = max([self_r[i] for i in range(len(cand)) if cand[i]] + [0.0])
    mc = max([cross_r[i] for i in range(len(cand)) if cand[i]] + [0.0])
    out = []
    for i in range(len(cand)):
        if not cand[i]:
            out.append(0.0)
        else:
            out.append(self_weight * self_r[i] / max(ms, 1e-30) + (1 - self_weight) * cross_r[i] / max(mc, 1e-30))
    return out


def compact_ref(keep, score, capacity, forced=None):
    t = len(keep)
    forced = [False] * t if forced is None else list(forced)

    def key(i):
        if forced[i]:
            return (0, 0.0, i)
        if keep[i]:
            return (1, -score[i], i)
        return (2, 0.0, i)

    chosen = sorted(sorted(range(t), key=key)[:capacity])
    return chosen, [bool(keep[i]) for i in chosen]


# -- invariant helpers shared by the pruning tests ----------------------------------------------------------


def check_pruned_state(state_in, state_out, keep_idx, num_protected=0):
    """A pruned state must equal gathering ``keep_idx`` from the input, with a consistent source map."""
    x_in, x_out = np.asarray(state_in.x), np.asarray(state_out.x)
    keep_idx = np.asarray(keep_idx)
    b, k = keep_idx.shape
    assert x_out.shape == (b, k, x_in.shape[-1])
    for e in range(b):
        assert list(keep_idx[e]) == sorted(set(keep_idx[e].tolist())), "kept indices must be sorted and unique"
        assert set(range(num_protected)) <= set(keep_idx[e].tolist()), "protected tokens must survive"
        np.testing.assert_array_equal(x_out[e], x_in[e][keep_idx[e]])
        np.testing.assert_array_equal(np.asarray(state_out.positions)[e], np.asarray(state_in.positions)[e][keep_idx[e]])
        np.testing.assert_array_equal(np.asarray(state_out.sizes)[e], np.asarray(state_in.sizes)[e][keep_idx[e]])
        if state_out.source is not None:
            src = np.asarray(state_out.source)[e]
            for n, slot in enumerate(src):
                if slot >= 0:
                    assert keep_idx[e][slot] == np.asarray(state_in.source)[e][n]
                else:
                    assert np.asarray(state_in.source)[e][n] not in set(keep_idx[e].tolist())


# -- CDPruner / Script (conditional DPP) ----------------------------------------------------------------


def cos_matrix_ref(x):
    """Cosine similarity of every pair of rows, float64, explicit loops (norms clamped at 1e-8); a row's
    similarity with itself is 1 (0 for a zero row)."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    norms = [math.sqrt(float(np.dot(v, v))) for v in x]
    return np.array([[(1.0 if norms[i] > 1e-8 else 0.0) if i == j else cos_torch(x[i], x[j]) for j in range(n)]
                     for i in range(n)])


def dpp_kernel_ref(x, relevance=None):
    """``L[i, j] = r_i S_ij r_j`` with loops."""
    s = cos_matrix_ref(x)
    n = s.shape[0]
    r = [1.0] * n if relevance is None else [float(v) for v in relevance]
    return np.array([[r[i] * s[i, j] * r[j] for j in range(n)] for i in range(n)])


def _det(m):
    return float(np.linalg.det(m)) if len(m) else 1.0


def dpp_greedy_ref(kernel, k, valid=None, tol_rel=1e-5):
    """The naive greedy log-det maximisation: each step adds the token that maximises
    ``det L[S+j] / det L[S]`` over the live picks ``S`` (a determinant per candidate). A gain at most
    ``tol_rel * max(diag L)`` is exhausted: exhausted valid tokens come after every live one, invalid tokens after
    every valid one, lowest index first. Returns ``(order, smallest margin between the best and the second live
    gain, smallest distance of any gain from the threshold)``."""
    lk = np.asarray(kernel, np.float64)
    n = lk.shape[0]
    ok = [True] * n if valid is None else [bool(v) for v in valid]
    tol = tol_rel * max([lk[i, i] for i in range(n) if ok[i]] + [1e-30])
    live, order, gaps, near = [], [], [], []
    base = _det(lk[np.ix_(live, live)])
    for _ in range(k):
        gains = {}
        for j in range(n):
            if j in order or not ok[j]:
                continue
            sub = live + [j]
            gains[j] = _det(lk[np.ix_(sub, sub)]) / base
            near.append(abs(gains[j] - tol))
        alive = [j for j in sorted(gains) if gains[j] > tol]
        if alive:
            ranked = sorted(alive, key=lambda j: (-gains[j], j))
            j = ranked[0]
            if len(ranked) > 1 and gains[ranked[0]] != gains[ranked[1]]:   # exact ties are well posed
                gaps.append(gains[ranked[0]] - gains[ranked[1]])
            live.append(j)
            base = _det(lk[np.ix_(live, live)])
        elif gains:
            j = min(gains)
        else:
            j = min(i for i in range(n) if i not in order)
        order.append(j)
    return order, min(gaps or [math.inf]), min(near or [math.inf])


def query_relevance_ref(h, starts, image_len, valid=None, relevance="similarity", theta=None):
    """One example's relevance (the port's GUESS): the mean unit direction of the valid text tokens after the
    first image start, cosine with every token, min-max over the image tokens. ``h: [T, C]``."""
    h = np.asarray(h, np.float64)
    t = h.shape[0]
    ok = [True] * t if valid is None else [bool(v) for v in valid]
    img = [any(s <= i < s + image_len for s in starts) for i in range(t)]
    if relevance == "none":
        return np.ones(t)
    unit = [h[i] / max(math.sqrt(float(np.dot(h[i], h[i]))), 1e-8) for i in range(t)]
    query = [i for i in range(t) if ok[i] and not img[i] and i >= min(starts)]
    if not query:
        return np.ones(t)
    q = sum(unit[i] for i in query)
    cos = [cos_torch(unit[i], q) for i in range(t)]
    s = [c if relevance == "similarity" else -c for c in cos]
    lo = min(s[i] for i in range(t) if img[i])
    hi = max(s[i] for i in range(t) if img[i])
    r = np.array([(v - lo + 1e-6) / max(hi - lo, 1e-6) for v in s])
    if theta is not None:
        r = np.exp(theta / (2 * (1 - theta)) * r)
    return r


def gsp_removed_ref(x, num_removed, tau=0.2, gamma=1.0, valid=None):
    """Script's bipartite GSP: sources = even positions; a source's edges go to valid odd positions with
    cosine >= tau; redundancy = degree * exp(gamma * (mean edge similarity - tau)); the ``num_removed`` most
    redundant valid sources with a positive score are removed (ties: lower index). Returns the removed set."""
    s = cos_matrix_ref(x)
    n = s.shape[0]
    ok = [True] * n if valid is None else [bool(v) for v in valid]
    score = {}
    for i in range(0, n, 2):
        if not ok[i]:
            continue
        edges = [s[i, j] for j in range(1, n, 2) if ok[j] and s[i, j] >= tau]
        score[i] = len(edges) * math.exp(gamma * (sum(edges) / len(edges) - tau)) if edges else 0.0
    ranked = sorted(score, key=lambda i: (-score[i], i))[:num_removed]
    return {i for i in ranked if score[i] > 0}


def script_code_ref(kernel, k, valid=None):
    """The official Script loop (7e5e2f3) as written, per sample: argmax of d over unselected tokens; if
    d_j > 0 subtract the projection term, whose correction divides by d[prev] = -inf and so vanishes."""
    lk = np.asarray(kernel, np.float64)
    n = lk.shape[0]
    ok = [True] * n if valid is None else [bool(v) for v in valid]
    d = [lk[i, i] for i in range(n)]
    order, gaps = [], []
    for _ in range(k):
        free = [j for j in range(n) if j not in order]
        cand = [j for j in free if ok[j]] or free
        ranked = sorted(cand, key=lambda j: (-d[j], j))
        j = ranked[0]
        if len(ranked) > 1 and d[ranked[0]] > -math.inf and d[ranked[0]] != d[ranked[1]]:   # exact ties: well posed
            gaps.append(d[ranked[0]] - d[ranked[1]])
        order.append(j)
        if ok[j] and d[j] > 0:
            proj = [lk[m, j] for m in range(n)]
            for prev in order[:-1]:
                coeff = lk[j, prev] / (d[prev] + 1e-6)      # d[prev] = -inf: coeff = -0.0
                proj = [p - coeff * lk[m, prev] for m, p in enumerate(proj)]
            proj = [p / (math.sqrt(d[j]) + 1e-6) for p in proj]
            d = [v - p * p for v, p in zip(d, proj)]
            d[j] = -math.inf
    return order, min(gaps or [math.inf])


# -- MrT5-style delete gate (reduction/delete_gate.py), written from the MrT5 paper / official code --------------


def delete_gate_ref(hidden, w, b, scale):
    """``G[b, t] = scale * sigmoid(-(sum_c hidden[b, t, c] w[c] + b))``, one token at a time."""
    hidden = np.asarray(hidden, np.float64)
    out = np.zeros(hidden.shape[:2])
    for i in range(hidden.shape[0]):
        for t in range(hidden.shape[1]):
            z = sum(hidden[i, t, c] * float(w[c]) for c in range(hidden.shape[2])) + float(b)
            out[i, t] = scale / (1.0 + np.exp(min(z, 700.0)))
    return out


def hard_delete_ref(gate, candidates, threshold, capacity, valid=None):
    """Keep every non-candidate and each candidate with ``G > threshold``; if more than ``capacity`` survive, the
    lowest-gate candidates go first; a candidate invalid in ``valid`` never survives. Returns ``(slot indices
    ascending, slot used)`` per example, unused slots holding the lowest unkept indices (a stable compaction)."""
    idx_out, valid_out = [], []
    for i in range(gate.shape[0]):
        t = gate.shape[1]
        forced = [j for j in range(t) if not candidates[i, j]]          # padding included: it takes a slot
        passing = [j for j in range(t) if candidates[i, j] and gate[i, j] > threshold
                   and (valid is None or valid[i, j])]
        passing = sorted(passing, key=lambda j: (-gate[i, j], j))[:max(capacity - len(forced), 0)]
        chosen = forced + passing
        rest = [j for j in range(t) if j not in chosen]
        slots = sorted(chosen + rest[:capacity - len(chosen)])
        keep = set(passing) | set(forced)
        idx_out.append(slots)
        valid_out.append([j in keep for j in slots])
    return np.array(idx_out), np.array(valid_out)


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos * inv
    cos, sin = np.cos(np.concatenate([ang, ang])), np.sin(np.concatenate([ang, ang]))
    rot = np.concatenate([-x[d // 2:], x[:d // 2]])
    return x * cos + rot * sin


def llama_block_ref(x, positions, valid, key_bias, p, *, heads, kv_heads, eps, theta):
    """One pre-norm Llama block (RMSNorm, RoPE attention with grouped KV heads, SwiGLU), a query at a time, with an
    additive ``key_bias[b, s]`` on every logit of key ``s`` (MrT5's soft deletion). ``p``: numpy weights
    ``ln1, wq, wk, wv, wo, ln2, wg, wu, wd`` with ``y = x @ W``. ``x: [B, T, C]``."""
    x = np.asarray(x, np.float64)
    b_, t_, c = x.shape
    dh = p["wq"].shape[1] // heads
    out = np.zeros_like(x)
    for b in range(b_):
        xn = _rms(x[b], p["ln1"], eps)
        q = (xn @ p["wq"]).reshape(t_, heads, dh)
        k = (xn @ p["wk"]).reshape(t_, kv_heads, dh)
        v = (xn @ p["wv"]).reshape(t_, kv_heads, dh)
        o = np.zeros((t_, heads, dh))
        kr = [[_rope(k[s, g], positions[b, s], theta) for g in range(kv_heads)] for s in range(t_)]
        for i in range(t_):
            for h in range(heads):
                g = h // (heads // kv_heads)
                qi = _rope(q[i, h], positions[b, i], theta)
                logits, vals = [], []
                for s in range(t_):
                    if (s <= i and valid[b, s]) or s == i:
                        logits.append(qi @ kr[s][g] / np.sqrt(dh) + key_bias[b, s])
                        vals.append(v[s, g])
                w = np.exp(np.array(logits) - max(logits))
                o[i, h] = (w / w.sum()) @ np.array(vals)
        y = x[b] + o.reshape(t_, heads * dh) @ p["wo"]
        yn = _rms(y, p["ln2"], eps)
        gate = yn @ p["wg"]
        out[b] = y + ((gate / (1 + np.exp(-gate))) * (yn @ p["wu"])) @ p["wd"]
    return out
