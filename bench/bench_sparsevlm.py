"""SparseVLM's own cost, part by part, against the 7B-shaped decoder layer of ``bench/bench_prune_ops.py``.

Shapes as that script's LLM methods rows: B=1, T = 576 image + 64 text tokens, C=1024, 16 heads, SwiGLU 2816, the
reducer before decoder layer 1 with keep 128 (114 kept + 14 merged clusters of 139 recycled) and the last 64 prompt
rows of attention. Rows: the whole reducer call (plan + ``apply_step``), its step alone, the rater choice, the rater
relevance (``rater_relevance``) next to the two-pass ``crossattn.weighted_row_scores`` it replaced, the DPC-kNN,
and the ``count="rank"`` (v1) reducer. Interleaved rounds, ratio = median over rounds of op / layer (paired).

    python bench/bench_sparsevlm.py [--repeats 15] [--out results/bench/sparsevlm.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import reduction as R  # noqa: E402
from bench.bench_prune_ops import _w, decoder_layer, timeit  # noqa: E402
from reduction.crossattn import weighted_row_scores  # noqa: E402
from reduction.sparsevlm import dpc_knn, rater_relevance, rater_weights, sparsevlm_step  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="results/bench/sparsevlm.json")
    args = ap.parse_args(argv)
    b, img, txt, c, h, mlp = 1, 576, 64, 1024, 16, 2816
    t = img + txt
    kl = jax.random.split(jax.random.key(2), 10)
    dp = dict(n1=jnp.ones(c), n2=jnp.ones(c), qkv=_w(kl[0], (c, 3 * c)), o=_w(kl[1], (c, c)),
              gate=_w(kl[2], (c, mlp)), up=_w(kl[3], (c, mlp)), down=_w(kl[4], (mlp, c)))
    x = jax.random.normal(kl[5], (b, t, c))
    starts = jnp.zeros((b,), jnp.int32)
    rows = jax.nn.softmax(jax.random.normal(kl[8], (b, h, txt, t)), axis=-1)
    spec = {"method": "sparsevlm", "layers": [1], "keep": 128}
    red = R.build_layer_reducers(2, spec, point="llm")[1]
    rank = R.build_layer_reducers(2, {**spec, "count": "rank"}, point="llm")[1]
    k, rec, cl = red.counts(img)
    st = R.init_state(x)

    def info(r):
        return R.LayerInfo(layer=1, num_layers=2, image_len=img, image_starts=starts, text_attention=r)

    w = rater_weights(x, starts[:, None], img, txt)
    fns = {
        "layer": jax.jit(lambda x: decoder_layer(dp, x, h)),
        "reducer": jax.jit(lambda s, r: red(s, info(r)).x),
        "reducer count=rank": jax.jit(lambda s, r: rank(s, info(r)).x),
        "step": jax.jit(lambda x, r: sparsevlm_step(x, r, starts, image_len=img, kept=k, recycled=rec,
                                                    clusters=cl).assign),
        "rater_weights": jax.jit(lambda x: rater_weights(x, starts[:, None], img, txt)),
        "rater_relevance": jax.jit(rater_relevance),
        "weighted_row_scores (before)": jax.jit(weighted_row_scores),
        "dpc_knn": jax.jit(lambda x: dpc_knn(x[0, :rec], cl)),
    }
    a = {"layer": (x,), "reducer": (st, rows), "reducer count=rank": (st, rows), "step": (x, rows),
         "rater_weights": (x,), "rater_relevance": (rows, w), "weighted_row_scores (before)": (rows, w),
         "dpc_knn": (x,)}
    ms, ratio = timeit(fns, a, args.repeats)
    out = {"shapes": dict(B=b, T=t, image=img, text=txt, C=c, H=h, mlp=mlp, kept=k, recycled=rec, clusters=cl),
           "median_ms": ms, "ratio_to_layer": ratio, "target_le": 0.05}
    for name in fns:
        print(f"{name:30s} {ms[name]:9.3f} ms  {100 * ratio.get(name, 1.0):6.2f}% of the layer")
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
