"""Prefill and decode timing of a scaled-down LLaVA-1.5-7B-shaped LLM with in-LLM / connector reduction.

The stack keeps 7B's ratios (head dim 128, MLP = 11008/4096 x width, MHA) at a smaller width and depth:
``--layers 4 --dim 1024`` by default (8 heads, MLP 2752), vocab 32000, 576 image tokens + ~64 text tokens
(35 before the image, the rest after, as in LLaVA-1.5's template). Rows: 100% kept, DART at K=2 with budgets
192/128/64 (196/132/68 kept), FastV at K=2 with the same budgets, connector pooling k=2 (144) and k=3 (64;
square pools cannot give 192/128). Analytic FLOPs use reduction.flops (2 x MACs, SwiGLU, GQA kv_dim).
All ratios come from one run. ``--quick`` shrinks everything to prove the script works.

    python bench/bench_vlm.py --out results/bench/vlm.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.connector import ConnectorReduction
from models.llama import Llama, LlamaConfig, positions_from_valid
from models.vlm import DARTPruner, FastVPruner
from reduction.flops import transformer_flops


def _time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--image-tokens", type=int, default=576)
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--out", default="results/bench/vlm.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.dim, args.image_tokens, args.text_tokens, args.repeats, args.decode_steps = 3, 128, 64, 16, 1, 2
    heads = args.dim // 128 if args.dim >= 256 else 2
    mlp = int(round(args.dim * 11008 / 4096 / 16)) * 16
    cfg = LlamaConfig(vocab_size=32000 if not args.quick else 256, dim=args.dim, num_layers=args.layers,
                      num_heads=heads, num_kv_heads=heads, mlp_dim=mlp)
    lm = Llama(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(lm)
    n_img, n_txt = args.image_tokens, args.text_tokens
    pre = min(35, n_txt // 2)
    t = n_img + n_txt
    x = jax.random.normal(jax.random.key(0), (1, t, args.dim)) * 0.02
    valid = jnp.ones((1, t), bool)
    pos = positions_from_valid(valid)
    starts = jnp.asarray([pre], jnp.int32)
    side = int(round(n_img ** 0.5))
    budgets = [192, 128, 64] if not args.quick else [16, 8]

    rows = [("full", None, None)]
    rows += [(f"dart_b{b}", DARTPruner(layer=2, budget=b), None) for b in budgets]
    rows += [(f"fastv_b{b}", FastVPruner(layer=2, budget=b), None) for b in budgets]
    rows += [(f"pool_k{k}", None, ConnectorReduction(method="pool", k=k, grid=(side, side))) for k in (2, 3)]

    results = []
    for name, pruner, conn in rows:
        n_in = n_img if conn is None else conn.num_out(n_img)
        xt = x[:, : t - n_img + n_in]
        v, p = valid[:, : xt.shape[1]], pos[:, : xt.shape[1]]

        @jax.jit
        def prefill(params, xt, p, v):
            m = nnx.merge(graphdef, params)
            return m.prefill_cache(xt, p, v, extra=args.decode_steps, pruner=pruner, image_starts=starts,
                                   image_len=n_in)[:2]

        @jax.jit
        def decode(params, tok, cache):
            return nnx.merge(graphdef, params).decode_step(tok, cache)

        prefill_s = _time(prefill, params, xt, p, v, repeats=args.repeats)
        _, cache = prefill(params, xt, p, v)
        tok = jnp.zeros((1,), jnp.int32)
        jax.block_until_ready(decode(params, tok, cache))
        t0 = time.perf_counter()
        c = cache
        for _ in range(args.decode_steps):
            _, c = decode(params, tok, c)
        jax.block_until_ready(c)
        decode_s = (time.perf_counter() - t0) / args.decode_steps
        tokens = [xt.shape[1] if (pruner is None or l < pruner.layer) else pruner.num_out(xt.shape[1], n_in)
                  for l in range(args.layers)]
        flops = transformer_flops(tokens, args.dim, mlp, gated=True, kv_dim=cfg.num_kv_heads * cfg.dh)
        kept_img = n_in if pruner is None else n_in - (xt.shape[1] - pruner.num_out(xt.shape[1], n_in))
        results.append(dict(name=name, kept_image_tokens=kept_img, kept_fraction=kept_img / n_img,
                            tokens_per_layer=tokens, prefill_s=prefill_s, decode_s_per_token=decode_s, flops=flops))
    base = results[0]
    for r in results:
        r["flop_ratio"] = base["flops"] / r["flops"]
        r["prefill_speedup"] = base["prefill_s"] / r["prefill_s"]
        r["decode_speedup"] = base["decode_s_per_token"] / r["decode_s_per_token"]
        r["speedup_over_flop_ratio"] = r["prefill_speedup"] / r["flop_ratio"]
        print(f"{r['name']:>12} kept {r['kept_image_tokens']:4d} ({100 * r['kept_fraction']:5.1f}%) "
              f"prefill {1e3 * r['prefill_s']:8.1f} ms x{r['prefill_speedup']:.2f} (FLOPs x{r['flop_ratio']:.2f}) "
              f"decode {1e3 * r['decode_s_per_token']:6.2f} ms/token x{r['decode_speedup']:.2f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(layers=args.layers, dim=args.dim, heads=heads, mlp_dim=mlp, vocab=cfg.vocab_size,
                image_tokens=n_img, text_tokens=n_txt, quick=args.quick, backend=jax.default_backend(),
                note="7B ratios (head dim 128, MLP 11008/4096, MHA) at reduced width/depth; ratios from one run")
    out.write_text(json.dumps(dict(config=meta, rows=results), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
