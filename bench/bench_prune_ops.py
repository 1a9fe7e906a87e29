"""Cost of each pruning method's selection + apply relative to the layer it sits in.

    python bench/bench_prune_ops.py                 # full run (median of interleaved repeats)
    python bench/bench_prune_ops.py --quick         # tiny shapes, 2 repeats: proves the script works

Every registered method (the "methods" rows): one reducer call (plan + ``apply_step``) with its default options at
keep 0.5 (ToMe ``r = T // 4``, pooling 2 x 2) on the ViT-S block's outputs, and at a budget of 128 image tokens
before the decoder layer, each timed against its layer in the same rounds and with its own analytic ``flops()``
over the layer's. Targets: 10% of a ViT-S block (issue 17), 5% of a decoder layer (issue 18).

ViT side: B=8, T=197 (cls + 14x14 patches), C=384, H=6, MLP 1536, float32, one pre-norm ViT-S block with
fused ``jax.nn.dot_product_attention``. Ops on the block's attention probabilities ``[B, H, T, T]`` and
keys averaged over heads ``[B, T, 64]``: Zero-TPrune at keep 0.7 (S:I = 1:1) with 1 iteration (last three
layers), 10 (middle layers) and 30 (first three layers); the registered default schedule prunes at layers
3 / 6 / 9 of 12 with 10 / 10 / 1 iterations, EViT top-k (keep 0.7), random (keep 0.7), 2x2 pooling, DART-ViT
(keep 0.7, 8 pivots). Targets: Zero-TPrune <= 10% of the block.

LLM side: a scaled-down 7B-shaped decoder layer (C=1024, 16 heads of 64, SwiGLU MLP 2816, RMSNorm, causal
fused attention), prefill of T = 576 image + 64 text tokens (image span at 0..575 is preceded by nothing;
start 0), B=1. DART selection at budget 128 (132 kept) with both pivot orders, and FastV selection from
the last query row. Target: DART selection <= 5% of the layer.

Eager columns (``bench/eager_calls.py``; ``--eager-only`` runs just these): each public op called outside any jit
(first call and warm call) against the same call jitted, as ratios.

Every function is jitted and warmed up; the timed calls are interleaved (layer, op, layer, op, ...) with
``block_until_ready``; a ratio is the median over rounds of ``op_i / layer_i`` (paired within a round, so
drifts of a shared machine cancel); the JSON written to ``--out`` holds medians (ms), ratios and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import reduction as R  # noqa: E402
from reduction.dart import dart_vit_keep_indices  # noqa: E402
from reduction.zerotprune import ZeroTPruneConfig  # noqa: E402
from bench.eager_calls import eager_columns, report as eager_report  # noqa: E402


def _ln(x, scale, bias):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * scale + bias


def _rms(x, scale):
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale


def _w(key, shape):
    return jax.random.normal(key, shape, jnp.float32) * shape[0] ** -0.5


def vit_block(p, x, heads):
    b, t, c = x.shape
    qkv = _ln(x, *p["ln1"]) @ p["qkv"]
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * heads, c // heads), 3, axis=2)
    x = x + jax.nn.dot_product_attention(q, k, v).reshape(b, t, c) @ p["proj"]
    return x + jax.nn.gelu(_ln(x, *p["ln2"]) @ p["fc1"], approximate=False) @ p["fc2"]


def vit_block_probs(p, x, heads):
    """The block a Zero-TPrune layer runs in: explicit softmax probabilities (the reducer needs them), then
    ``(x after attention [B, T, C], probs [B, H, T, T], keys averaged over heads [B, T, Dh])``."""
    b, t, c = x.shape
    qkv = _ln(x, *p["ln1"]) @ p["qkv"]
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * heads, c // heads), 3, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (c // heads) ** -0.5
    probs = jax.nn.softmax(logits, axis=-1)
    x = x + jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, c) @ p["proj"]
    return x, probs, k.mean(axis=2)


def vit_mlp(p, x):
    return x + jax.nn.gelu(_ln(x, *p["ln2"]) @ p["fc1"], approximate=False) @ p["fc2"]


def decoder_layer(p, x, heads):
    b, t, c = x.shape
    qkv = _rms(x, p["n1"]) @ p["qkv"]
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * heads, c // heads), 3, axis=2)
    x = x + jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, c) @ p["o"]
    h = _rms(x, p["n2"])
    return x + (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]


def timeit(fns: dict, args: dict, repeats: int) -> tuple[dict, dict]:
    """Interleaved timing. Returns ``(median ms per function, median over rounds of fn_i / first_i)``; the
    first function is the layer the others are compared with."""
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))
        jax.block_until_ready(fn(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            times[name].append((time.perf_counter() - t0) * 1e3)
    first = next(iter(fns))
    paired = {name: statistics.median([a / b for a, b in zip(v, times[first])])
              for name, v in times.items() if name != first}
    return {name: statistics.median(v) for name, v in times.items()}, paired


# The amount each registered method gets in the every-method rows: a keep ratio of 0.5 where the method takes one,
# else its own amount key (ToMe-style merges: a quarter of the tokens per layer; pooling: a 2 x 2 window).
def _amount(method: str, num_tokens: int) -> dict:
    options = R.method_options(method)
    if "keep_ratio" in options:
        return {"keep_ratio": 0.5}
    if "r" in options:
        return {"r": num_tokens // 4}
    if "k" in options:
        return {"k": 2}
    return {}


def method_rows(point: str, layer_fn, layer_args: tuple, state, info_arrays: dict, static: dict, *, num_layers: int,
                layer: int, dim: int, heads: int, layer_flops: int, repeats: int, amount=_amount) -> dict:
    """Every method registered at ``point`` as one reducer call (plan + ``apply_step``), timed against
    ``layer_fn`` in the same interleaved rounds. ``info_arrays``: the ``LayerInfo`` array fields the point
    provides (all of them; a reducer reads what it ``needs``), ``static``: its static fields. Returns
    ``{method: {"ratio_to_layer", "median_ms", "analytic_ratio"}}`` or ``{"error": ...}`` for a method whose
    default spec cannot run at these shapes (recorded, not fatal)."""
    t = state.num_tokens
    rows, fns, args = {}, {"layer": jax.jit(layer_fn)}, {"layer": layer_args}
    names = [m for m in R.available_methods(point) if m != "none" and not m.startswith("_")]
    for m in names:
        try:
            reds = R.build_layer_reducers(num_layers, {"method": m, "layers": [layer], **amount(m, t)}, point=point)
            red = reds[layer]
            if getattr(red, "text_rows", 1) > 1 and "text_attention" in info_arrays:
                arrays = dict(info_arrays, text_attention=info_arrays["text_attention_rows"](red.text_rows))
            else:
                arrays = {k: v for k, v in info_arrays.items() if k != "text_attention_rows"}
            arrays = {k: v for k, v in arrays.items() if k != "text_attention_rows"}

            def call(s, a, red=red):
                return red(s, R.LayerInfo(layer=layer, num_layers=num_layers, **static, **a)).x

            fn = jax.jit(call)
            jax.block_until_ready(fn(state, arrays))
            fns[m], args[m] = fn, (state, arrays)
            rows[m] = {"analytic_ratio": red.flops(t, dim=dim, heads=heads) / layer_flops}
        except Exception as err:  # noqa: BLE001 - a row per method; one that cannot run here is reported
            rows[m] = {"error": f"{type(err).__name__}: {err}"}
    ms, ratio = timeit(fns, args, repeats)
    for m in fns:
        if m != "layer":
            rows[m].update(median_ms=ms[m], ratio_to_layer=ratio[m])
    rows["layer_median_ms"] = ms["layer"]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and 2 repeats")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default="results/bench/prune_ops.json")
    ap.add_argument("--eager-only", action="store_true",
                    help="only the eager-call columns (each public op called outside a jit vs jitted)")
    ap.add_argument("--uncompiled", action="store_true",
                    help="also time each op eagerly primitive by primitive (as before reduction._compiled; slow)")
    args = ap.parse_args(argv)
    repeats = 2 if args.quick else args.repeats

    # ---- ViT-S block and the ViT-side ops
    b, side, c, heads, mlp = (2, 6, 64, 2, 128) if args.quick else (8, 14, 384, 6, 1536)
    t = 1 + side * side
    ks = jax.random.split(jax.random.key(0), 8)
    vp = dict(ln1=(jnp.ones(c), jnp.zeros(c)), ln2=(jnp.ones(c), jnp.zeros(c)), qkv=_w(ks[0], (c, 3 * c)),
              proj=_w(ks[1], (c, c)), fc1=_w(ks[2], (c, mlp)), fc2=_w(ks[3], (mlp, c)))
    x = jax.random.normal(ks[4], (b, t, c))
    attn = jax.nn.softmax(jax.random.normal(ks[5], (b, heads, t, t)) * 2.0, axis=-1)
    metric = jax.random.normal(ks[6], (b, t, c // heads))
    state = R.init_state(x)
    keep = R.keep_count(t, 0.7, protected=1)
    r_total = t - keep
    r_s, r_i = r_total // 2, r_total - r_total // 2

    def zt(iters):
        cfg = ZeroTPruneConfig(iterations=iters)
        return jax.jit(lambda s, a, m: R.zerotprune(s, a, m, r_similarity=r_s, r_importance=r_i, config=cfg).x)

    vit_ops = {
        "vit_block": jax.jit(lambda x: vit_block(vp, x, heads)),
        "zerotprune_1it": zt(1),
        "zerotprune_10it": zt(10),
        "zerotprune_30it": zt(30),
        "topk_cls": jax.jit(lambda s, a: R.apply_step(s, R.prune_step(R.topk_keep_indices(
            a[:, :, 0, :].mean(1), keep=keep, num_protected=1), t)).x),
        "random": jax.jit(lambda s, k: R.apply_step(s, R.prune_step(R.random_keep_indices(
            k, b, t, keep=keep, num_protected=1), t)).x),
        "pool_2x2": jax.jit(lambda s: R.pool_tokens(s, k=2, num_protected=1).x),
        "dart_vit": jax.jit(lambda s, m: R.apply_step(s, R.prune_step(dart_vit_keep_indices(
            s.x, keep=keep, num_protected=1, keys=m), t)).x),
    }
    zt_args = (state, attn, metric)
    vit_args = {"vit_block": (x,), "zerotprune_1it": zt_args, "zerotprune_10it": zt_args, "zerotprune_30it": zt_args,
                "topk_cls": (state, attn), "random": (state, jax.random.key(1)), "pool_2x2": (state,),
                "dart_vit": (state, metric)}
    vit_ms, vit_ratio = ({}, {}) if args.eager_only else timeit(vit_ops, vit_args, repeats)

    # ---- Zero-TPrune inside the block it runs in (one jit): attention with explicit probabilities, the
    # pruning step on those probabilities, the MLP on the kept tokens. The same block that keeps the first K
    # tokens instead (a free selection, same MLP work) isolates the step's in-model cost:
    # (block+zerotprune - block+first_K) / fused-attention block.
    def in_block(iters):
        cfg = ZeroTPruneConfig(iterations=iters)

        def fn(x):
            y, probs, km = vit_block_probs(vp, x, heads)
            if iters == -1:
                return vit_mlp(vp, y)
            if iters == -2:
                return vit_mlp(vp, y[:, :keep])
            st = R.zerotprune(R.init_state(y), probs, km, r_similarity=r_s, r_importance=r_i, config=cfg)
            return vit_mlp(vp, st.x)

        return jax.jit(fn)

    fused_ops = {"vit_block": vit_ops["vit_block"], "probs_block": in_block(-1), "probs_block+first_K": in_block(-2),
                 "probs_block+zerotprune_10it": in_block(10), "probs_block+zerotprune_30it": in_block(30)}
    fused_ms, fused_ratio, in_model = {}, {}, {}
    if not args.eager_only:
        fused_ms, fused_ratio = timeit(fused_ops, {k: (x,) for k in fused_ops}, repeats)
        in_model = {f"zerotprune_{n}it": fused_ratio[f"probs_block+zerotprune_{n}it"]
                    - fused_ratio["probs_block+first_K"] for n in (10, 30)}

    # ---- decoder layer and the LLM-side selections
    bl, img, txt, cl, hl, ml = (1, 48, 16, 128, 4, 256) if args.quick else (1, 576, 64, 1024, 16, 2816)
    tl = img + txt
    budget = 16 if args.quick else 128
    kl = jax.random.split(jax.random.key(2), 10)
    dp = dict(n1=jnp.ones(cl), n2=jnp.ones(cl), qkv=_w(kl[0], (cl, 3 * cl)), o=_w(kl[1], (cl, cl)),
              gate=_w(kl[2], (cl, ml)), up=_w(kl[3], (cl, ml)), down=_w(kl[4], (ml, cl)))
    xl = jax.random.normal(kl[5], (bl, tl, cl))
    keys = jax.random.normal(kl[6], (bl, tl, cl))
    starts = jnp.zeros((bl,), jnp.int32)
    last_rows = jax.nn.softmax(jax.random.normal(kl[7], (bl, hl, 1, tl)), axis=-1)
    llm_ops = {
        "decoder_layer": jax.jit(lambda x: decoder_layer(dp, x, hl)),
        "dart_ascending": jax.jit(lambda h, k, s: R.dart_keep_indices(h, k, image_starts=s, image_len=img,
                                                                      budget=budget, pivot_order="ascending")),
        "dart_cpython_set": jax.jit(lambda h, k, s: R.dart_keep_indices(h, k, image_starts=s, image_len=img,
                                                                        budget=budget, pivot_order="cpython_set")),
        "fastv": jax.jit(lambda a, s: R.fastv_keep_indices(a, image_starts=s, image_len=img, budget=budget)),
    }
    llm_args = {"decoder_layer": (xl,), "dart_ascending": (xl, keys, starts), "dart_cpython_set": (xl, keys, starts),
                "fastv": (last_rows, starts)}
    llm_ms, llm_ratio = ({}, {}) if args.eager_only else timeit(llm_ops, llm_args, repeats)

    # ---- eager calls: each public op outside any jit (one compiled program per configuration and shape)
    cfg1 = ZeroTPruneConfig(iterations=1)
    step = jax.jit(lambda a: R.prune_step(R.topk_keep_indices(a[:, :, 0, :].mean(1), keep=keep, num_protected=1),
                                          t))(attn)
    cls_scores = attn[:, :, 0, :].mean(1)
    eager_cases = {
        "topk_keep_indices": (lambda sc: R.topk_keep_indices(sc, keep=keep, num_protected=1), (cls_scores,)),
        "random_keep_indices": (lambda k: R.random_keep_indices(k, b, t, keep=keep, num_protected=1),
                                (jax.random.key(1),)),
        "prune_step": (lambda i: R.prune_step(i, t), (step.anchor,)),
        "apply_step (prune)": (lambda s, st: R.apply_step(s, st), (state, step)),
        "pool_tokens": (lambda s: R.pool_tokens(s, k=2, num_protected=1), (state,)),
        "dart_vit_keep_indices": (lambda s, m: dart_vit_keep_indices(s.x, keep=keep, num_protected=1, keys=m),
                                  (state, metric)),
        "zerotprune (1 it)": (lambda s, a, m: R.zerotprune(s, a, m, r_similarity=r_s, r_importance=r_i, config=cfg1),
                              (state, attn, metric)),
        "dart_keep_indices (LLM)": (lambda h, k, s: R.dart_keep_indices(h, k, image_starts=s, image_len=img,
                                                                         budget=budget), (xl, keys, starts)),
        "fastv_keep_indices (LLM)": (lambda a, s: R.fastv_keep_indices(a, image_starts=s, image_len=img,
                                                                        budget=budget), (last_rows, starts)),
    }
    eager = eager_report(eager_columns(eager_cases, repeats, uncompiled=args.uncompiled),
                         f"ViT B={b} T={t} C={c}; LLM B={bl} T={tl} C={cl}")
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}
    if args.eager_only:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"quick": args.quick, "repeats": repeats, "machine": machine, "eager": eager},
                                  indent=2))
        print(f"wrote {out}")
        return eager

    # ---- every registered method at the ViT block (one reducer call on the block's outputs) and before the
    # decoder layer (prefill; the rows of the last text queries as the LLM point hands them over)
    vit_flops = 2 * b * t * (4 * c * c + 2 * c * mlp) + 4 * b * t * t * c
    vit_methods = method_rows(
        "vit", lambda x: vit_block(vp, x, heads), (x,), state,
        {"metric": metric, "attention": attn, "keys": metric, "hidden": x, "rng": jax.random.key(3)},
        {"num_protected": 1}, num_layers=1, layer=0, dim=c, heads=heads, layer_flops=vit_flops // b,
        repeats=repeats)
    full_rows = jax.nn.softmax(jax.random.normal(kl[8], (bl, hl, txt, tl)), axis=-1)
    llm_flops = 2 * tl * (4 * cl * cl + 3 * cl * ml) + 2 * tl * tl * cl
    llm_methods = method_rows(
        "llm", lambda x: decoder_layer(dp, x, hl), (xl,), R.init_state(xl),
        {"hidden": xl, "keys": keys, "text_attention": last_rows, "layer_attention": last_rows,
         "attention": jax.nn.softmax(jax.random.normal(kl[9], (bl, hl, tl, tl)), axis=-1),
         "image_starts": starts, "rng": jax.random.key(4),
         "text_attention_rows": lambda n: full_rows[:, :, -min(n, txt):]},
        {"image_len": img}, num_layers=2, layer=1, dim=cl, heads=hl, layer_flops=llm_flops, repeats=repeats,
        amount=lambda m, n: {"keep": budget})

    result = {
        "quick": args.quick, "repeats": repeats,
        "machine": machine,
        "eager": eager,
        "vit": {"shapes": dict(B=b, T=t, C=c, H=heads, mlp=mlp, keep=keep, r_similarity=r_s, r_importance=r_i),
                "median_ms": vit_ms, "ratio_to_block": vit_ratio,
                "in_block_median_ms": fused_ms, "in_block_ratio_to_block": fused_ratio,
                "in_model_step_ratio_to_block": in_model,
                "target_zerotprune_le": 0.10},
        "llm": {"shapes": dict(B=bl, T=tl, image=img, text=txt, C=cl, H=hl, mlp=ml, budget=budget,
                               kept=R.dart_kept_per_image(img, budget)),
                "median_ms": llm_ms, "ratio_to_layer": llm_ratio, "target_dart_le": 0.05},
        "vit_methods": {"note": "each registered ViT method as one reducer call (plan + apply_step) at keep 0.5 "
                                "(ToMe r = T // 4, pool 2x2) vs the fused ViT-S block; analytic_ratio: the method's "
                                "own flops() / the block's", "target_le": 0.10, "rows": vit_methods},
        "llm_methods": {"note": "each registered LLM method as one reducer call before decoder layer 1, keep "
                                f"{budget} per image, vs the decoder layer", "target_le": 0.05, "rows": llm_methods},
    }
    for k, v in vit_ms.items():
        print(f"vit  {k:18s} {v:9.3f} ms" + ("" if k == "vit_block" else f"   {vit_ratio[k]:6.3f} x block"))
    for k, v in fused_ms.items():
        if k != "vit_block":
            print(f"vit  {k:28s} {v:9.3f} ms   {fused_ratio[k]:6.3f} x fused-attention block")
    for k, v in in_model.items():
        print(f"vit  {k} in the block (minus the same block keeping the first K): {v:6.3f} x block")
    for k, v in llm_ms.items():
        print(f"llm  {k:18s} {v:9.3f} ms" + ("" if k == "decoder_layer" else f"   {llm_ratio[k]:6.3f} x layer"))
    for label, rows in (("vit", vit_methods), ("llm", llm_methods)):
        for m, row in rows.items():
            if m == "layer_median_ms":
                continue
            if "error" in row:
                print(f"{label} method {m:14s} not run: {row['error'][:100]}")
            else:
                print(f"{label} method {m:14s} {row['median_ms']:9.3f} ms   {row['ratio_to_layer']:6.3f} x "
                      f"{'block' if label == 'vit' else 'layer'}   analytic {row['analytic_ratio']:6.3f}")
    worst_default = max(vit_ratio["zerotprune_10it"], vit_ratio["zerotprune_1it"])
    result["vit"]["zerotprune_default_schedule_worst_step_ratio"] = worst_default
    print(f"Zero-TPrune, default schedule (layers 3/6/9 with 10/10/1 iterations): worst step "
          f"{worst_default:.1%} of a block; early-layer placement (30 iterations) "
          f"{vit_ratio['zerotprune_30it']:.1%} (target <= 10%)")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
