"""Is a trained ATP threshold instance-adaptive in effect? Kept-token distribution and equal-FLOP controls.

``python eval.py --config eval_atp_adaptive checkpoint=runs/atp_threshold`` loads a ``train.py`` run with learned
ATP reducers (``model.atp``, :class:`reduction.nnx.LearnedATP`) and measures on the test images:

* **learned**: the run as trained (inference mode: keep ``score > theta(image)`` plus the forced tokens, at the
  static capacity). Per image: the kept tokens at every ATP layer, ``theta``, the FLOPs counted on the valid tokens
  (:meth:`models.vit.ViT.valid_flops`), correct or not. The distribution (histogram, mean, std, min, max) goes to
  ``summary.json`` / ``per_image.csv`` / ``kept_hist.png``.
* **constant theta**: the same weights with each ATP MLP's output replaced by one constant (``fc2`` kernel 0, bias
  ``logit(c)``), ``c`` found by bisection so that the *average* kept count on these images equals the learned one
  (so the average valid-token FLOPs match: they are affine in the kept count at one ATP layer). The threshold is
  tuned on the count only, never on accuracy. Also ``c = mean(theta)`` and how many images then keep another count.
* **static controls at the same average count**: every image keeps exactly ``K`` patches, ``K`` the floor and the
  ceiling of the learned mean (accuracy linearly interpolated to the exact mean): the same ATP score's top-``K``
  (theta 0, capacity ``K``), the class-token attention top-``K`` (``topk_cls``) and random ``K`` (``random``), the
  last two with the learned modules removed (same fine-tuned backbone).
* **unreduced**: the same backbone without any reduction.

Outputs in ``results/atp_adaptive/<run name>/``: ``summary.json`` (everything), ``rows.csv`` (one row per setting),
``per_image.csv``, ``kept_hist.png``.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def load_trained(workdir):
    """``(model, train_config)`` of a ``train.py`` run (latest checkpoint); the model must carry learned ATP layers."""
    import ml_collections

    import training as train_lib
    from evaluation.builtin import _load_run_params

    workdir = pathlib.Path(workdir)
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {workdir} (a train.py run directory is needed)")
    tcfg = ml_collections.ConfigDict(json.loads(path.read_text()))
    if "atp" not in tcfg.model:
        raise ValueError(f"{workdir} was not trained with learned ATP thresholds (no model.atp block)")
    model = train_lib.build_model(tcfg)
    _load_run_params(model, workdir)
    return model, tcfg


def without_learned(model):
    """A clone of ``model`` without its learned reducers (same backbone weights)."""
    from flax import nnx

    clone = nnx.clone(model)
    clone.learned = nnx.Dict({})
    return clone


def constant_theta(model, thetas: dict):
    """A clone whose ATP module at each layer of ``thetas`` predicts the constant ``thetas[layer]`` for every image."""
    from flax import nnx

    clone = nnx.clone(model)
    for layer, c in thetas.items():
        mod = clone.learned[str(layer)]
        c = min(max(float(c), 1e-7), 1 - 1e-7)
        mod.fc2.kernel[...] = jnp.zeros_like(mod.fc2.kernel[...])
        mod.fc2.bias[...] = jnp.full_like(mod.fc2.bias[...], math.log(c / (1 - c)))
    return clone


def score_topk(model, layer: int, keep: int):
    """A clone whose ATP module at ``layer`` keeps the ``keep`` highest-scoring patches of every image (theta 0, so
    every patch passes, capacity ``keep`` patches; the forced grid first)."""
    clone = constant_theta(model, {layer: 1e-7})
    mod = clone.learned[str(layer)]
    n = model.num_tokens(model.config.image_size) - model.config.num_protected
    mod.capacity_ratio = (keep + 0.5) / n
    return clone


_COMPILED: dict = {}


def _forward(model, reducers):
    """Jitted ``images -> (pred, counts, theta)``; one program per (graph, reducers), so the clones of
    :func:`constant_theta` (same graph, new parameter values) reuse it."""
    from flax import nnx

    graphdef, params = nnx.split(model)
    key = (graphdef, reducers)
    try:
        fn = _COMPILED.get(key)
    except TypeError:                   # an unhashable reducer: compile for this call only
        key, fn = None, None
    if fn is None:
        @jax.jit
        def fn(p, images):
            out, aux = nnx.merge(graphdef, p)(images, reducers=reducers)
            theta = {k: v["theta"] for k, v in aux["reducer_aux"].items() if "theta" in v}
            return jnp.argmax(out, -1), aux["valid_tokens_per_layer"], theta

        if key is not None:
            _COMPILED[key] = fn
    return lambda images: fn(params, images)


def evaluate(model, images: np.ndarray, labels: np.ndarray, *, reducers=None, batch_size: int = 500,
             mean=(0.0,), std=(1.0,)) -> dict:
    """Run ``model`` (inference mode) over uint8 ``images [N, 28, 28]``: ``pred [N]``, ``correct [N]``,
    ``counts [N, depth, 2]`` valid tokens per layer, ``theta {layer: [N]}``, ``gflops [N]`` (valid tokens)."""
    from evaluation.data import batches, to_rgb
    from models.vit import _as_reducers

    size = model.config.image_size
    reducers = _as_reducers(reducers, model.config.depth)
    fn = _forward(model, reducers)
    preds, counts, thetas = [], [], {}
    for start, stop in batches(len(images), batch_size):
        chunk = np.asarray(images[start:stop])
        if stop - start < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - (stop - start),) + chunk.shape[1:], chunk.dtype)])
        pred, cnt, theta = fn(to_rgb(chunk, size, mean, std))
        preds.append(np.asarray(pred)[: stop - start])
        counts.append(np.asarray(cnt)[: stop - start])
        for k, v in theta.items():
            thetas.setdefault(int(k), []).append(np.asarray(v)[: stop - start])
    pred, counts = np.concatenate(preds), np.concatenate(counts)
    return {"pred": pred, "correct": pred == np.asarray(labels), "counts": counts,
            "theta": {k: np.concatenate(v) for k, v in thetas.items()},
            "gflops": model.valid_flops(counts, size, reducers) / 1e9}


FEATURE_NAMES = ("score_mean", "score_std", "score_max", "self_sum", "cross_sum")


def mlp_inputs(model, images: np.ndarray, layer: int, *, batch_size: int = 500, mean=(0.0,), std=(1.0,)) -> np.ndarray:
    """``[N, 5]`` the pooled score statistics the ATP MLP at ``layer`` reads (:data:`FEATURE_NAMES`), per image.
    Only for the first learned layer (no reduction before it)."""
    import reduction as R
    from reduction import atp
    from evaluation.data import batches, to_rgb

    if layer != model.learned_layers[0]:
        raise ValueError("mlp_inputs reads the first learned ATP layer only")
    mod = model.learned[str(layer)]
    p = model.config.num_protected

    @jax.jit
    def feats(x):
        tok = model.embed(x)
        state = R.init_state(tok)
        for blk in model.blocks[:layer]:
            state = blk(state)
        blk = model.blocks[layer]
        _, _, probs = blk.attn(blk.norm1(state.x), bias=None, need_probs=True)
        b, t = tok.shape[:2]
        cand = jnp.broadcast_to(jnp.arange(t) >= p, (b, t))
        self_r, cross_r, score = atp.vit_atp_inputs(probs, cand, self_weight=mod.self_weight)
        return mod.features(score, self_r, cross_r, cand)

    out = []
    for start, stop in batches(len(images), batch_size):
        out.append(np.asarray(feats(to_rgb(np.asarray(images[start:stop]), model.config.image_size, mean, std))))
    return np.concatenate(out)


def kept_at(result: dict, layer: int) -> np.ndarray:
    """``[N]`` valid tokens after the reducer of ``layer`` (class token included)."""
    return result["counts"][:, layer, 1]


def bisect_constant(model, layer: int, target: float, images, labels, *, steps: int, lo: float = 0.0,
                    hi: float = 1.0, thetas: Optional[dict] = None, **kw) -> tuple[float, dict]:
    """Constant threshold at ``layer`` whose mean kept count over ``images`` is closest to ``target`` (the kept count
    falls as the threshold rises). ``thetas``: constants already fixed at earlier layers."""
    thetas = dict(thetas or {})
    best = None
    for _ in range(int(steps)):
        mid = 0.5 * (lo + hi)
        res = evaluate(constant_theta(model, {**thetas, layer: mid}), images, labels, **kw)
        m = float(kept_at(res, layer).mean())
        if best is None or abs(m - target) < abs(best[2] - target):
            best = (mid, res, m)
        if m == target:
            break
        lo, hi = (mid, hi) if m > target else (lo, mid)
    return best[0], best[1]


def _dist(values: np.ndarray) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "p5": float(np.percentile(v, 5)), "p95": float(np.percentile(v, 95))}


def _row(name: str, res: dict, base_gflops: float, layers, **extra) -> dict:
    row = {"setting": name, "accuracy": float(res["correct"].mean()), "gflops_mean": float(res["gflops"].mean()),
           "gflops_std": float(res["gflops"].std()), "flops_fraction": float(res["gflops"].mean() / base_gflops)}
    for layer in layers:
        k = kept_at(res, layer)
        row[f"kept_tokens_L{layer}_mean"] = float(k.mean())
        row[f"kept_tokens_L{layer}_std"] = float(k.std())
    row.update(extra)
    return row


def run(cfg, out_dir: pathlib.Path, *, progress: bool = True) -> dict:
    """Every measurement of the module docstring; writes the outputs to ``out_dir`` and returns the summary."""
    from evaluation.data import load_fashion_mnist, subset
    from reduction.reducers import build_layer_reducers

    start = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)
    model, tcfg = load_trained(cfg.checkpoint)
    layers = list(model.learned_layers)
    if tcfg.data.name != "fashion_mnist":
        raise ValueError(f"eval_atp_adaptive reads Fashion-MNIST; the run was trained on {tcfg.data.name!r}")
    images, labels = load_fashion_mnist("test")
    if cfg.num_test and cfg.num_test < len(images):
        images, labels = subset(images, labels, int(cfg.num_test), seed=int(cfg.seed))
    mean = tuple(np.ravel(tcfg.data.mean).tolist())
    std = tuple(np.ravel(tcfg.data.std).tolist())
    kw = dict(batch_size=int(cfg.batch_size), mean=mean, std=std)
    n_cand = model.num_tokens(model.config.image_size) - model.config.num_protected
    plain = without_learned(model)
    base = evaluate(plain, images, labels, **kw)
    base_gflops = float(base["gflops"].mean())
    rows = [_row("unreduced", base, base_gflops, [])]
    say(f"[atp] unreduced {rows[0]['accuracy']:.4f}")

    learned = evaluate(model, images, labels, **kw)
    rows.append(_row("learned theta", learned, base_gflops, layers))
    say(f"[atp] learned {rows[-1]['accuracy']:.4f} at {rows[-1]['flops_fraction']:.3f} of the FLOPs")

    # one constant per ATP layer, layer by layer, each matching the learned mean kept count at its layer
    consts: dict = {}
    const = None
    for layer in layers:
        consts[layer], const = bisect_constant(model, layer, float(kept_at(learned, layer).mean()), images, labels,
                                               steps=int(cfg.bisection_steps), thetas=consts, **kw)
    rows.append(_row("constant theta (bisection, same mean kept)", const, base_gflops, layers,
                     theta={str(k): v for k, v in consts.items()}))
    say(f"[atp] constant {rows[-1]['accuracy']:.4f} at {rows[-1]['flops_fraction']:.3f}")
    mean_theta = {layer: float(learned["theta"][layer].mean()) for layer in layers}
    at_mean = evaluate(constant_theta(model, mean_theta), images, labels, **kw)
    changed = {layer: int(np.sum(kept_at(at_mean, layer) != kept_at(learned, layer))) for layer in layers}
    rows.append(_row("constant theta = mean learned theta", at_mean, base_gflops, layers,
                     theta={str(k): v for k, v in mean_theta.items()}))

    # static controls at the floor and ceiling of the learned mean kept patches (first ATP layer)
    layer = layers[0]
    mean_patches = float(kept_at(learned, layer).mean()) - model.config.num_protected
    static = {}
    for k in sorted({int(math.floor(mean_patches)), int(math.ceil(mean_patches))}):
        k = max(1, min(k, n_cand))
        settings = {"ATP score top-K": (score_topk(model, layer, k), None)}
        for method in cfg.static_methods:
            spec = {"method": method, "keep": k, "layers": [layer]}
            settings[f"{method} K"] = (plain, tuple(build_layer_reducers(model.config.depth, spec)))
        for name, (m, reds) in settings.items():
            res = evaluate(m, images, labels, reducers=reds, **kw)
            rows.append(_row(f"{name}={k}", res, base_gflops, [layer], keep=k))
            static.setdefault(name, {})[k] = rows[-1]
            say(f"[atp] {name}={k}: {rows[-1]['accuracy']:.4f} at {rows[-1]['flops_fraction']:.3f}")
    interpolated = {}
    for name, by_k in static.items():
        ks = sorted(by_k)
        if len(ks) == 1:
            interpolated[name] = by_k[ks[0]]["accuracy"]
        else:
            w = mean_patches - ks[0]
            interpolated[name] = (1 - w) * by_k[ks[0]]["accuracy"] + w * by_k[ks[1]]["accuracy"]

    mlp_stats = {}
    try:
        f = mlp_inputs(model, images, layer, **kw)
        mlp_stats = {n: _dist(f[:, i]) for i, n in enumerate(FEATURE_NAMES)}
        corr = [float(np.corrcoef(f[:, i], learned["theta"][layer])[0, 1]) if f[:, i].std() > 0 else None
                for i in range(f.shape[1])]
        mlp_stats["corr_with_theta"] = dict(zip(FEATURE_NAMES, corr))
    except ValueError:
        pass
    kept_l = kept_at(learned, layer)
    kept_c = kept_at(const, layer)
    more = kept_l > kept_c
    fewer = kept_l < kept_c
    summary = {
        "checkpoint": str(cfg.checkpoint), "num_test": int(len(images)), "atp_layers": layers,
        "num_candidates": int(n_cand), "base_gflops": base_gflops,
        "flop_count": "per image, on its valid tokens (models.vit.ViT.valid_flops), mean over the test images",
        "learned": {
            **{f"kept_tokens_L{l}": _dist(kept_at(learned, l)) for l in layers},
            **{f"theta_L{l}": _dist(learned["theta"][l]) for l in layers},
            f"kept_tokens_hist_L{layer}": {str(int(v)): int(c) for v, c in zip(*np.unique(kept_l, return_counts=True))},
            "images_changed_by_mean_theta": {str(k): v for k, v in changed.items()},
        },
        "constant": {
            "theta": {str(k): v for k, v in consts.items()},
            **{f"kept_tokens_L{l}": _dist(kept_at(const, l)) for l in layers},
            f"kept_tokens_hist_L{layer}": {str(int(v)): int(c) for v, c in zip(*np.unique(kept_c, return_counts=True))},
        },
        "kept_tokens_by_label_L%d" % layer: {
            str(c): {"learned": float(kept_l[labels == c].mean()), "constant": float(kept_c[labels == c].mean())}
            for c in np.unique(labels)},
        "learned_minus_constant_accuracy": float(learned["correct"].mean() - const["correct"].mean()),
        "where_learned_keeps_more": {"images": int(more.sum()),
                                     "learned_acc": float(learned["correct"][more].mean()) if more.any() else None,
                                     "constant_acc": float(const["correct"][more].mean()) if more.any() else None},
        "where_learned_keeps_fewer": {"images": int(fewer.sum()),
                                      "learned_acc": float(learned["correct"][fewer].mean()) if fewer.any() else None,
                                      "constant_acc": float(const["correct"][fewer].mean()) if fewer.any() else None},
        "static_interpolated_accuracy_at_learned_mean": interpolated,
        "mlp_inputs_L%d" % layer: mlp_stats,
        "learned_mean_kept_patches_L%d" % layer: mean_patches,
        "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with (out_dir / "rows.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()})
    with (out_dir / "per_image.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "label", f"kept_learned_L{layer}", f"theta_L{layer}", "correct_learned",
                    f"kept_constant_L{layer}", "correct_constant", "gflops_learned", "gflops_constant"])
        for i in range(len(images)):
            w.writerow([i, int(labels[i]), int(kept_l[i]), f"{learned['theta'][layer][i]:.6f}",
                        int(learned["correct"][i]), int(kept_c[i]), int(const["correct"][i]),
                        f"{learned['gflops'][i]:.6g}", f"{const['gflops'][i]:.6g}"])
    _plot(kept_l, kept_c, learned["theta"][layer], out_dir / "kept_hist.png", layer=layer,
          acc=(rows[1]["accuracy"], rows[2]["accuracy"]))
    summary["total_s"] = time.perf_counter() - start
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def _plot(kept_l, kept_c, theta, path: pathlib.Path, *, layer: int, acc) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    lo, hi = int(min(kept_l.min(), kept_c.min())), int(max(kept_l.max(), kept_c.max()))
    bins = np.arange(lo - 0.5, hi + 1.5)
    a.hist(kept_l, bins=bins, alpha=0.6, label=f"learned theta ({100 * acc[0]:.2f}%)")
    a.hist(kept_c, bins=bins, alpha=0.6, label=f"constant theta ({100 * acc[1]:.2f}%)")
    a.set_xlabel(f"valid tokens after block {layer} (class token included)")
    a.set_ylabel("test images")
    a.legend(fontsize=8)
    b.hist(theta, bins=40)
    b.set_xlabel(f"learned theta at block {layer}")
    b.set_ylabel("test images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(summary: dict) -> str:
    """The rows of :func:`run` as a markdown table (accuracy, FLOP fraction on valid tokens, kept tokens)."""
    layer = summary["atp_layers"][0]
    lines = [f"ATP layers {summary['atp_layers']}, {summary['num_test']} test images; FLOPs per image on its valid "
             f"tokens (unreduced {summary['base_gflops'] * 1e3:.3f} MFLOPs).", "",
             f"| setting | accuracy % | FLOPs frac | kept tokens after block {layer}: mean | std |", "|---|---|---|---|---|"]
    for r in summary["rows"]:
        m = r.get(f"kept_tokens_L{layer}_mean")
        s = r.get(f"kept_tokens_L{layer}_std")
        lines.append(f"| {r['setting']} | {100 * r['accuracy']:.2f} | {r['flops_fraction']:.4f} | "
                     f"{'-' if m is None else f'{m:.3f}'} | {'-' if s is None else f'{s:.3f}'} |")
    th = summary["learned"][f"theta_L{layer}"]
    lines += ["", f"learned theta: mean {th['mean']:.4f}, std {th['std']:.4f}, min {th['min']:.4f}, max {th['max']:.4f}; "
              f"theta = its mean changes the kept count of {summary['learned']['images_changed_by_mean_theta']} images; "
              f"static controls interpolated to the learned mean: "
              + ", ".join(f"{k} {100 * v:.2f}%" for k, v in summary["static_interpolated_accuracy_at_learned_mean"].items())]
    return "\n".join(lines)
