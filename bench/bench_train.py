"""Training-step throughput with and without ToMe on a CPU-sized preset, measured in one run.

    python bench/bench_train.py                    # vit_fmnist (17 tokens), ToMe r=2, 20 timed steps per setting
    python bench/bench_train.py --quick            # tiny run that proves the script works
    python bench/bench_train.py --r 8 --steps 50 --out results/bench/train.json

Both settings use the same jitted train step of ``train.py`` (same model, optimizer and data), on
synthetic batches already on device, so the ratio isolates the model-side cost. Settings alternate in
rounds and the median step time per setting is reported, with images/s and the speed-up ratio.
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import configs  # noqa: E402
import train  # noqa: E402


def build_step(cfg):
    model = train.build_model(cfg)
    reducers = train.layer_reducers(cfg, model)
    task = train.make_task(cfg, model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = train.build_optimizer(cfg, params)
    state = {"params": params, "rest": rest, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    fn = jax.jit(train.make_train_step(graphdef, task, tx, cfg, reducers, train.learning_rate_schedule(cfg)),
                 donate_argnums=0)
    tpl = model.tokens_per_layer(int(cfg.model.vit.image_size), reducers)
    return fn, state, tpl, model.flops(int(cfg.model.vit.image_size), reducers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="vit_fmnist")
    p.add_argument("--r", type=int, default=2, help="ToMe merges per layer")
    p.add_argument("--batch", type=int, default=0, help="batch size (0 = the preset's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="results/bench/train.json")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    overrides = list(a.overrides)
    if a.quick:
        a.steps, a.rounds = 2, 1
        overrides += ["model.vit.width=32", "model.vit.depth=2", "model.vit.mlp_dim=64", "model.vit.heads=2"]
        a.batch = a.batch or 16
    settings = {"baseline": ["model.reduction.r=0"], "tome": [f"model.reduction.r={a.r}"]}
    runs = {}
    for name, extra in settings.items():
        cfg = configs.load_config(a.config, overrides + extra + ([f"train.batch_size={a.batch}"] if a.batch else []))
        fn, state, tpl, flops = build_step(cfg)
        bs = int(cfg.train.batch_size)
        size = int(cfg.model.vit.image_size)
        rng = np.random.default_rng(0)
        batch = {"image": jnp.asarray(rng.integers(0, 256, (bs, size, size, 1), dtype=np.uint8)),
                 "label": jnp.asarray(rng.integers(0, int(cfg.model.vit.num_classes), bs).astype(np.int32))}
        t0 = time.perf_counter()
        state, m = fn(state, batch, jax.random.key(0))
        jax.block_until_ready(m)
        runs[name] = dict(fn=fn, state=state, batch=batch, times=[], compile_s=time.perf_counter() - t0,
                          tokens_per_layer=tpl, flops_per_image=flops, batch_size=bs)
    for _ in range(a.rounds):
        for name, r in runs.items():
            for _ in range(a.steps):
                t0 = time.perf_counter()
                r["state"], m = r["fn"](r["state"], r["batch"], jax.random.key(1))
                jax.block_until_ready(m)
                r["times"].append(time.perf_counter() - t0)
    result = {"config": a.config, "r": a.r, "quick": a.quick, "overrides": overrides,
              "device": jax.devices()[0].device_kind, "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "settings": {}}
    for name, r in runs.items():
        med = statistics.median(r["times"])
        result["settings"][name] = {"median_step_s": med, "images_per_s": r["batch_size"] / med,
                                    "compile_s": r["compile_s"], "steps_timed": len(r["times"]),
                                    "tokens_per_layer": r["tokens_per_layer"], "flops_per_image": r["flops_per_image"]}
    s = result["settings"]
    result["speedup_tome_vs_baseline"] = s["tome"]["images_per_s"] / s["baseline"]["images_per_s"]
    result["flops_ratio_baseline_vs_tome"] = s["baseline"]["flops_per_image"] / s["tome"]["flops_per_image"]
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "settings"} |
                     {n: {"images_per_s": round(v["images_per_s"], 1)} for n, v in s.items()}))
    return result


if __name__ == "__main__":
    main()
