"""AnyRes comparison on one VLM: thumbnail only, AnyRes unreduced, AnyRes + GlobalCom2 and same-budget baselines.

The model is the VLM sweep's (``cfg.train_config``, the trained projector ``cfg.projector``); the data are the
training set's scenes at a larger size (``cfg.train_overrides``, e.g. 224 px boards of 8 x 8 cells), so that the
tower-sized thumbnail (112 px) halves every object while each 2 x 2 crop looks like a training scene. Every
setting is ``(label, tiled, spec)``: ``tiled=False`` feeds the thumbnail alone (the images resized to the tower's
size by ``data.input_size``, the same resize the tiled model uses for its thumbnail); ``tiled=True`` uses
``VLMConfig.tiling = cfg.tiling`` with the connector ``spec``.

The budgets are those of the VLM sweep: for every fraction in ``cfg.fractions`` (1/3, 2/9, 1/9) and every variant
in ``cfg.variants`` (:data:`VARIANTS`: GlobalCom2, the uniform per-crop allocation with GlobalCom2's ranking, and
per-crop random pruning) a row with ``keep = round(fraction x the AnyRes span's tokens)``; GlobalCom2 turns
``keep`` into its base ratio (:func:`reduction.globalcom2.keep_to_ratio`). ``cfg.baselines`` adds the thumbnail
alone and AnyRes unreduced first; ``cfg.settings`` adds explicit ``(label, tiled, spec)`` rows.

Columns: ``accuracy``; ``image_tokens`` (static slots entering the LLM), ``real_tokens`` (mean valid slots: below
the capacity for GlobalCom2's data-dependent per-crop counts); analytic FLOPs (at the static slot count: masked
slots are computed); ``prefill_ms`` (median over the evaluation batches after the first).

Entry point: :func:`run` (``eval.py --config eval_vlm_anyres``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger("tokenreduce.eval")

COLUMNS = ("label", "accuracy", "image_tokens", "real_tokens", "total_flops", "real_total_flops", "flop_ratio",
           "prefill_ms")
# the same-budget rows: GlobalCom2 and its baselines (connector options besides keep and grid)
VARIANTS = {"globalcom2": {}, "uniform": {"allocation": "uniform"},
            "random": {"allocation": "uniform", "selection": "random"}}


def anyres_settings(cfg, tiled_tokens: int) -> list:
    """``(label, tiled, spec)`` rows: the baselines, the budgets x variants, then ``cfg.settings``."""
    from configs import spec_from_node

    tiling = [int(v) for v in cfg.tiling]
    rows = [("thumbnail", False, None), ("anyres", True, None)] if cfg.get("baselines", True) else []
    for frac in cfg.get("fractions", ()) or ():
        keep = max(1, int(round(float(frac) * tiled_tokens)))
        for name in cfg.get("variants", ()) or ():
            if name not in VARIANTS:
                raise ValueError(f"variants: unknown {name!r}; choose from {sorted(VARIANTS)}")
            rows.append((f"anyres+{name}@{float(frac):.3f}", True,
                         {"point": "connector", "method": "globalcom2", "grid": tiling, "keep": keep,
                          **VARIANTS[name]}))
    for label, use_tiles, spec in cfg.get("settings", ()) or ():
        spec = None if spec is None else dict(spec_from_node(spec) if hasattr(spec, "to_dict") else spec)
        rows.append((label, bool(use_tiles), spec))
    return rows


def run(cfg, out_dir: pathlib.Path, *, progress: bool = True) -> dict:
    from configs import load_config, save_config
    from data import eval_batches, make_source
    from evaluation.vlm_sweep import _score_fn, _task_for, load_projector, real_prefill_flops
    from models.vlm import VLM
    from training.builders import build_vlm
    from training.tasks import batch_images, make_task

    start = time.perf_counter()
    tcfg = load_config(cfg.train_config, list(cfg.train_overrides))
    model = build_vlm(tcfg)
    proj_src = load_projector(model, cfg.projector)
    size = model.cfg.vision.image_size
    tiling = tuple(int(v) for v in cfg.tiling)
    tiled = VLM(dataclasses.replace(model.cfg, tiling=tiling), vision_tower=model.vision_tower,
                language_model=model.language_model, projector=model.multi_modal_projector)
    thumb_cfg = load_config(cfg.train_config, list(cfg.train_overrides) + [f"data.input_size={size}"])
    task = make_task(tcfg, model)
    src = make_source(tcfg.data, tcfg.data.eval_split)
    n = min(int(cfg.num_test), len(src))
    batches = [{k: jnp.asarray(v) for k, v in b.items()}
               for b in eval_batches(src, batch_size=int(cfg.batch_size), limit=n, shard_index=0, shard_count=1)]
    text_tokens = len(getattr(task, "prefix_ids", ())) + int(task.question_len)
    rows = []
    for label, use_tiles, spec in anyres_settings(cfg, tiled.num_image_tokens()):
        m, dcfg = (tiled, tcfg) if use_tiles else (model, thumb_cfg)
        graphdef, params = nnx.split(m)
        plan = m.build_plan(spec)
        t = _task_for(task, m, plan)
        fn = _score_fn(t, dcfg, graphdef)
        count = jax.jit(lambda p, img, g=graphdef, pl=plan: _real_tokens(nnx.merge(g, p), img, pl))
        t0 = time.perf_counter()
        correct, mask, times, real, empty = [], [], [], [], []
        for b in batches:
            t1 = time.perf_counter()
            c, e = fn(params, b)
            correct.append(np.asarray(c))
            empty.append(np.asarray(e))
            times.append(time.perf_counter() - t1)
            mask.append(np.asarray(b["mask"]))
            real.append(np.asarray(count(params, batch_images(b, dcfg))))
        correct, mask, real = np.concatenate(correct), np.concatenate(mask), np.concatenate(real)
        fl = m.flops(plan, text_tokens=text_tokens)
        real_prefill = real_prefill_flops(m.cfg.text, fl["prefill"], fl["cache_lengths"],
                                          np.concatenate(empty)[mask])
        rows.append(dict(label=label, tiled=bool(use_tiles), spec=spec, accuracy=float(correct[mask].mean()),
                         image_tokens=fl["image_tokens"], real_tokens=float(real[mask].mean()),
                         tower_flops=fl["tower"], total_flops=fl["total"],
                         real_total_flops=float(fl["tower"] + fl["connector"] + real_prefill.mean()),
                         prefill_ms=1000 * statistics.median(times[1:] if len(times) > 1 else times),
                         wall_s=time.perf_counter() - t0))
        log.info("%s: acc %.3f, %d image slots (%.1f real), %.2f GFLOP", label, rows[-1]["accuracy"],
                 fl["image_tokens"], rows[-1]["real_tokens"], fl["total"] / 1e9)
        if progress:
            print(f"{label}: acc {rows[-1]['accuracy']:.3f}, {fl['image_tokens']} slots "
                  f"({rows[-1]['real_tokens']:.1f} real), {fl['total'] / 1e9:.2f} GFLOP, "
                  f"{rows[-1]['wall_s']:.0f} s", flush=True)
    # against AnyRes unreduced (analytic, so also without the baseline rows)
    base_flops = tiled.flops(tiled.build_plan(None), text_tokens=text_tokens)["total"]
    for r in rows:
        r["flop_ratio"] = base_flops / r["total_flops"]
    meta = dict(config_name=cfg.config_name, train_config=cfg.train_config, overrides=list(cfg.train_overrides),
                projector=proj_src, num_test=n, batch_size=int(cfg.batch_size), tiling=tiling,
                device=str(jax.devices()[0].platform), total_s=time.perf_counter() - start)
    result = dict(meta=meta, points=rows)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    (out_dir / "points.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "table.md").write_text(markdown_table(result))
    result["paths"] = {k: str(out_dir / k) for k in ("points.json", "table.md")}
    return result


def _real_tokens(model, images, plan):
    _, valid = model.image_tokens(images, plan)
    k = model.num_image_tokens(plan)
    return jnp.full((images.shape[0],), k, jnp.int32) if valid is None else jnp.sum(valid, axis=1)


def markdown_table(result) -> str:
    m = result["meta"]
    head = (f"AnyRes `{m['config_name']}`: {m['num_test']} examples ({' '.join(m['overrides'])}), tiling "
            f"{m['tiling']}, projector {m['projector']}, {m['device']}\n\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in result["points"]:
        vals = []
        for c in COLUMNS:
            v = r.get(c)
            if c in ("total_flops", "real_total_flops"):
                vals.append(f"{v / 1e9:.2f} G")
            elif isinstance(v, float):
                vals.append(f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}")
            else:
                vals.append(str(v))
        lines.append("| " + " | ".join(vals) + " |")
    return head + "\n".join(lines) + "\n"


__all__ = ["run", "markdown_table", "anyres_settings", "VARIANTS"]
