"""Whole-pipeline VLM timing on the real model: DINOv2-small -> projector -> SmolLM2-135M (``configs/vlm_smol.py``).

At batch 8 (``--batch``), for the unreduced model and for DART and FastV inside the LLM, ToMe in the tower and
pooling at the connector, each keeping 1/3, 2/9 and 1/9 of the image tokens: the time of the compiled scoring
forward (tower + connector + prefill) and of one decode step over the reduced KV cache, against the analytic FLOP
and cache-size ratios, all measured in one process (:mod:`evaluation.vlm_sweep`; accuracy on the few examples used
here is not meaningful: see ``eval.py --config eval_vlm_smol``).

Decode is timed interleaved (``--decode interleaved``, the default): every setting's decode state is built first,
then ``--decode-rounds`` rounds each time one step of every setting in a rotated order, and a setting's speed-up is
the median over rounds of (unreduced step / its step) in the same round, so load drifts on a shared machine hit
both sides of each ratio. The cache of each state is restored from a copy every ``--decode-steps`` steps (untimed),
so no step writes past its capacity. ``--decode sweep`` keeps the sweep's own timing (each setting's 5 steps
right after its prefill, not paired: on this shared CPU these medians moved by 25% between settings with the same
cache). The ``roofline`` column is the decode speed-up that the bytes of one step allow: (parameter bytes + batch
x cache bytes) unreduced over the same reduced (the cache at its decode capacity).

Targets (issue 14): DART's prefill speed-up at 1/9 kept >= 0.8 of its FLOP ratio; decode with the reduced cache
faster per token than without by at least half the cache-size ratio's gain.

    python bench/bench_vlm.py                       # writes results/bench/vlm/{points.json,table.md,...}
    python bench/bench_vlm.py --decode-only         # only the interleaved decode section (no prefill sweep)
    python bench/bench_vlm.py --quick               # the tiny random VLM of configs/vlm_connector.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _bench_config(args):
    from configs import load_config

    cfg = load_config("eval_vlm_quick" if args.quick else "eval_vlm_smol")
    with cfg.unlocked():
        cfg.config_name = "bench_vlm"
        cfg.num_test = args.batch
        cfg.batch_size = args.batch
        cfg.repeats = args.repeats
        cfg.decode_steps = args.decode_steps if args.decode == "sweep" else 0
        cfg.methods.vision = ("tome",)
        cfg.methods.connector = ("pool",)
        cfg.methods.llm = ("dart", "fastv")
        if args.fractions:
            cfg.fractions = tuple(float(f) for f in args.fractions.split(","))
        if args.dtype != "float32":
            cfg.train_overrides = tuple(cfg.train_overrides) + (f"train.compute_dtype={args.dtype}",)
        if not pathlib.Path(str(cfg.projector)).exists():
            cfg.projector = ""          # timing does not depend on the projector's weights
    return cfg


def interleaved_decode(cfg, *, rounds: int, steps: int, progress: bool = True) -> dict:
    """Per-token decode time of every sweep setting of ``cfg``, interleaved (see the module docstring).

    Returns ``{label: dict(ms, speedup, capacities, cache_slots, cache_bytes, prefill_cache_bytes, roofline)}``
    (bytes per example; ``prefill_cache_bytes`` without the ``steps + 1`` free slots, the sweep's ``kv_ratio``); ``speedup`` is the
    median over rounds of the unreduced step's time over this setting's in the same round."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from configs import load_config
    from data import eval_batches, make_source
    from evaluation import vlm_sweep
    from models.generate import decode_next, start_decoding
    from training.builders import build_vlm
    from training.tasks import batch_images, make_task

    tcfg = load_config(cfg.train_config, list(cfg.train_overrides))
    model = build_vlm(tcfg)
    if cfg.projector:
        vlm_sweep.load_projector(model, cfg.projector)
    task = make_task(tcfg, model)
    src = make_source(tcfg.data, tcfg.data.eval_split)
    batch = next(iter(eval_batches(src, batch_size=int(cfg.batch_size), limit=int(cfg.batch_size), shard_index=0,
                                   shard_count=1)))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    settings = vlm_sweep.settings_for(cfg, model.num_image_tokens(model.build_plan(None)))
    lm = model.language_model
    param_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(nnx.state(lm, nnx.Param)))
    states, pristine, meta = {}, {}, {}
    for s in settings:
        t0 = time.perf_counter()
        t = vlm_sweep._task_for(task, model, model.build_plan(s.spec))
        ids, valid = t.prompt(batch)
        x, starts, token_valid = model.prompt_embeddings(ids, batch_images(batch, tcfg), t.plan)
        if token_valid is not None:
            valid = valid & token_valid
        st = start_decoding(lm, x, valid, max_new_tokens=steps + 1, reducers=t.plan.llm, image_starts=starts,
                            image_len=t.image_tokens)
        pristine[s.label] = (jax.tree.map(jnp.copy, st.cache), st.tokens, st.done)
        st = decode_next(st)                      # compiles
        jax.block_until_ready(st.tokens)
        states[s.label] = [st, 1]
        caps = st.cache.capacities
        cache_bytes = lm.kv_cache_bytes(caps, dtype=st.cache.layers[0].k.dtype)
        prefill_bytes = lm.kv_cache_bytes([c - (steps + 1) for c in caps], dtype=st.cache.layers[0].k.dtype)
        meta[s.label] = dict(capacities=list(caps), cache_slots=int(sum(caps)), cache_bytes=int(cache_bytes),
                             prefill_cache_bytes=int(prefill_bytes))
        if progress:
            print(f"decode state {s.label}: {sum(caps)} cache slots, {time.perf_counter() - t0:.1f} s", flush=True)
    labels = list(states)
    times = {k: [] for k in labels}
    for r in range(rounds):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        for k in order:
            st, used = states[k]
            if used >= steps:                      # restore the prefill cache (untimed) before it fills up
                cache, tok, done = pristine[k]
                st = dataclasses.replace(st, cache=jax.tree.map(jnp.copy, cache), tokens=tok, done=done)
                used = 0
            t0 = time.perf_counter()
            st = decode_next(st)
            jax.block_until_ready(st.tokens)
            times[k].append(time.perf_counter() - t0)
            states[k] = [st, used + 1]
    base = labels[0]
    b = meta[base]
    batch_size = int(cfg.batch_size)
    out = {}
    for k in labels:
        paired = [tb / tk for tb, tk in zip(times[base], times[k])]
        m = meta[k]
        out[k] = dict(ms=1000 * statistics.median(times[k]), speedup=statistics.median(paired),
                      roofline=(param_bytes + batch_size * b["cache_bytes"]) / (param_bytes + batch_size * m["cache_bytes"]),
                      param_bytes=param_bytes, **m)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-steps", type=int, default=8, help="new tokens a decode state's cache has room for")
    ap.add_argument("--decode", default="interleaved", choices=("interleaved", "sweep"),
                    help="decode timing: paired rounds over every setting (default) or the sweep's own")
    ap.add_argument("--decode-rounds", type=int, default=24)
    ap.add_argument("--decode-only", action="store_true", help="skip the prefill sweep (interleaved decode only)")
    ap.add_argument("--fractions", default="", help="comma-separated kept fractions (default: 1/3, 2/9, 1/9)")
    ap.add_argument("--out", default="results/bench/vlm")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype of the whole VLM (train.compute_dtype; the tower and LM parameters too, the projector's stay float32)")
    ap.add_argument("--quick", action="store_true", help="tiny random VLM (proves the script works)")
    args = ap.parse_args(argv)
    if args.decode_only and args.decode != "interleaved":
        ap.error("--decode-only times decode interleaved")

    from evaluation import vlm_sweep

    cfg = _bench_config(args)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    points, meta = [], {}
    if not args.decode_only:
        result = vlm_sweep.run(cfg, out_dir, progress=True)
        points, meta = result["points"], result["meta"]
    dec = None
    if args.decode == "interleaved":
        dec = interleaved_decode(cfg, rounds=args.decode_rounds, steps=args.decode_steps)
        (out_dir / "decode.json").write_text(json.dumps(dec, indent=2))
    rows = []
    labels = [p["label"] for p in points] or list(dec)
    by_label = {p["label"]: p for p in points}
    base_cache = None if dec is None else dec[labels[0]]["prefill_cache_bytes"]
    for label in labels:
        r = by_label.get(label, {})
        d = None if dec is None else dec[label]
        kv_ratio = r.get("kv_ratio") if d is None else base_cache / d["prefill_cache_bytes"]   # the sweep's ratio
        speedup = r.get("decode_speedup") if d is None else d["speedup"]
        gain = None if kv_ratio is None else kv_ratio - 1.0
        row = dict(label=label)
        if r:
            row.update(image_tokens=r["image_tokens"], flop_ratio=r["flop_ratio"], prefill_speedup=r["prefill_speedup"],
                       speedup_over_flop_ratio=r["prefill_speedup"] / r["flop_ratio"])
        row.update(kv_ratio=kv_ratio, decode_speedup=speedup,
                   decode_gain_over_half_kv_gain=None if not gain or not speedup else (speedup - 1.0) / (0.5 * gain))
        if d is not None:
            row.update(decode_ms=d["ms"], cache_slots=d["cache_slots"], roofline=d["roofline"])
        rows.append(row)
    summary = out_dir / "summary.json"
    summary.write_text(json.dumps(dict(meta=meta, rows=rows, decode_timing=args.decode), indent=2))
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("-" if r.get(c) is None else (f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]))
                                for c in cols) + " |")
    print(f"wrote {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
