"""ViT-S/16 throughput with and without token reduction, next to the analytic FLOP ratio.

Random init, float32, batch 8 at 224 px by default. Every configured method that is registered at run time is
measured (missing ones are skipped with a message); methods other than ToMe r=13 get a setting whose
analytic FLOPs are close to ToMe r=13's (matched FLOPs). Repeats are interleaved across methods (round-robin)
and the median is reported; the speed-up is also given as the median over rounds of ``t_none / t_method``
measured back to back in the same round (robust to the slow drifts of a shared machine). Output JSON (default ``results/bench/vit.json``) holds images/s, speed-up,
FLOP ratio and speed-up / FLOP ratio per method plus the machine description.

    python -m bench.bench_vit            # full run (quiet machine)
    python -m bench.bench_vit --quick    # tiny run that proves the script works
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import reduction as R
from models.vit import ViT, make_forward


def candidate_specs(depth: int) -> dict[str, list[dict]]:
    """Per method, a few settings; the one whose FLOPs are closest to ToMe r=13 is used."""
    return {
        "pitome": [{"method": "pitome", "keep_ratio": r} for r in (0.85, 0.875, 0.9, 0.925, 0.95)],
        "zerotprune": [{"method": "zerotprune", "layers": [3, 6, 9], "keep_ratio": k} for k in (0.4, 0.5, 0.6, 0.7)],
        "dart": [{"method": "dart", "keep_ratio": k, "layers": [2]} for k in (0.3, 0.4, 0.5, 0.6)],
        "pool": [{"method": "pool", "k": 2, "layers": [l]} for l in range(depth)],
    }


def machine() -> dict:
    return dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                jax=jax.__version__, devices=[str(d) for d in jax.devices()])


def pick_matched(model, image_size, target_flops, specs):
    best = None
    for spec in specs:
        try:
            reducers = model.build_reducers(spec)
            f = model.flops(image_size, reducers)
        except (TypeError, ValueError) as err:
            print(f"  spec {spec} rejected: {err}")
            continue
        if best is None or abs(f - target_flops) < abs(best[2] - target_flops):
            best = (spec, reducers, f)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description="ViT throughput under token reduction")
    ap.add_argument("--variant", default="S/16")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--r", type=int, default=13)
    ap.add_argument("--out", default="results/bench/vit.json")
    ap.add_argument("--quick", action="store_true", help="Ti/16 at 64 px, batch 2, 2 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.variant, args.image_size, args.batch, args.repeats, args.r = "Ti/16", 64, 2, 2, 2

    model = ViT.from_config(args.variant, image_size=args.image_size, num_classes=1000)
    depth = model.config.depth
    x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, args.image_size, args.image_size, 3)),
                    jnp.float32)
    base_flops = model.flops(args.image_size)
    tome_spec = {"method": "tome", "r": args.r}
    tome_red = model.build_reducers(tome_spec)
    tome_flops = model.flops(args.image_size, tome_red)
    runs = {"none": ({"method": "none"}, model.build_reducers(None), base_flops),
            f"tome_r{args.r}": (tome_spec, tome_red, tome_flops)}
    available = R.available_methods()
    for name, specs in candidate_specs(depth).items():
        if name not in available:
            print(f"skip {name}: not registered")
            continue
        best = pick_matched(model, args.image_size, tome_flops, specs)
        if best is None:
            print(f"skip {name}: no usable spec")
            continue
        runs[name] = best

    fns = {}
    for name, (spec, reducers, _) in runs.items():
        fn = make_forward(model, reducers)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x)[0])
        print(f"compiled {name} in {time.perf_counter() - t0:.1f}s")
        fns[name] = fn
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x)[0])
            times[name].append(time.perf_counter() - t0)

    base_t = float(np.median(times["none"]))
    results = []
    for name, (spec, reducers, flops) in runs.items():
        t = float(np.median(times[name]))
        speedup = base_t / t
        paired = float(np.median(np.asarray(times["none"]) / np.asarray(times[name])))
        flop_ratio = base_flops / flops
        results.append(dict(method=name, spec=spec, images_per_s=args.batch / t, median_s=t, times_s=times[name],
                            gflops_per_image=flops / 1e9, flop_ratio=flop_ratio, speedup=speedup,
                            speedup_over_flop_ratio=speedup / flop_ratio, paired_speedup=paired,
                            paired_speedup_over_flop_ratio=paired / flop_ratio,
                            final_tokens=model.tokens_per_layer(args.image_size, reducers)[-1][1]))
        print(f"{name:>12}: {args.batch / t:7.1f} img/s  speed-up {speedup:4.2f}x (paired {paired:4.2f}x)  "
              f"FLOP ratio {flop_ratio:4.2f}x  speed-up/FLOP ratio {speedup / flop_ratio:4.2f} "
              f"(paired {paired / flop_ratio:4.2f})  ({flops / 1e9:.2f} GFLOP/img)")
    out = dict(variant=args.variant, image_size=args.image_size, batch=args.batch, repeats=args.repeats,
               dtype="float32", quick=args.quick, machine=machine(), results=results)
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
