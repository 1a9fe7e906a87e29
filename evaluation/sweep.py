"""Methods x FLOP budgets on one backbone: the points of a trade-off sweep.

A :class:`Backbone` bundles what the sweep needs from a model: its cost model (the model's own analytic
FLOPs and token counts, which the budget solver prices and the report shows), the input size, and a pure
feature function
``features(images [B, S, S, 3], reducers: tuple, rng) -> [B, F]`` that runs the model with one reducer
(or ``None``) per layer. The probe is fitted once, on unreduced features of the training subset; every
reduced setting is then evaluated at inference only, with that same probe.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from evaluation import measure
from evaluation.probe import DEFAULT_L2, RidgeProbe, fit_ridge_probe
from evaluation import budget
from reduction.reducers import SpecError, available_methods, build_layer_reducers, method_info


@dataclasses.dataclass
class Backbone:
    """A model seen by the sweep.

    Attributes:
      name: shown in reports.
      cost: the model's :class:`evaluation.budget.CostModel` at ``image_size`` (depth, tokens, its own analytic
        ``flops`` and ``tokens_per_layer`` of a reducer tuple, the elementwise estimate for the XLA check).
      image_size: input side S in pixels.
      features: ``(params, images [B, S, S, 3] f32, reducers tuple, rng) -> [B, F]``, pure and jit-able.
      params: the pytree passed as ``features``' first argument (weights stay arguments, not constants).
      classifier: ``features`` returns class logits (a trained classifier): accuracy is its arg-max and
        no probe is fitted.
      mean, std: input normalisation (ImageNet by default).
      source_map: optional ``(params, images, reducers, rng) -> [B, N]`` final token of every original
        token (``-1`` if pruned), for the visualisations.
      valid_counts: optional ``(params, images, reducers, rng) -> [B, depth, 2]`` valid tokens entering each
        layer's attention and MLP per image (priced by ``cost.valid_flops``).
      adaptive: optional ``reducers -> bool``: the setting leaves a validity mask (a capacity-padded,
        instance-adaptive method such as ``atp`` or ``tokencorr``), so its FLOPs are counted on the valid tokens.
    """

    name: str
    cost: budget.CostModel
    image_size: int
    features: measure.FeatureFn
    params: Any = None
    source_map: Optional[Callable] = None
    classifier: bool = False
    valid_counts: Optional[Callable] = None
    adaptive: Optional[Callable] = None
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)

    def flops(self, reducers: tuple) -> int:
        return int(self.cost.flops(reducers))

    def elementwise_flops(self, reducers: tuple) -> int:
        """The stated elementwise estimate (XLA counting) added to the analytic count for the cross-check."""
        return 0 if self.cost.elementwise is None else int(self.cost.elementwise(reducers))

    def counts_valid(self, reducers: tuple) -> bool:
        """Whether this setting's FLOPs are counted on the valid tokens (see :func:`valid_flop_stats`)."""
        return (self.valid_counts is not None and self.adaptive is not None and self.cost.valid_flops is not None
                and bool(self.adaptive(reducers)))

    def token_counts(self, reducers: tuple) -> list:
        return [tuple(int(v) for v in pair) for pair in self.cost.tokens_per_layer(reducers)]


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    methods: Sequence[str] = ("all",)
    targets: Sequence[float] = (0.9, 0.75, 0.6, 0.5)
    batch_size: int = 50
    throughput_batch: int = 32
    warmup: int = 1
    repeats: int = 5
    flop_tolerance: float = 0.05
    seed: int = 0
    l2_grid: Sequence[float] = DEFAULT_L2
    options: tuple = ()            # ((method, {option: value}), ...): fixed options of each method's specs


def resolve_methods(methods: Sequence[str]) -> list[str]:
    """``("all",)`` = every registered method that runs in a ViT block, except ``none`` (the reference point) and
    private ``_names``, sorted. A name that is not registered, or cannot run in a ViT block, raises
    :class:`reduction.SpecError` before anything is built."""
    out: list[str] = []
    for m in methods:
        if m == "all":
            out += [n for n in available_methods("vit") if n != "none" and not n.startswith("_")]
        else:
            out.append(m)
    seen: list[str] = []
    for m in out:
        if m not in seen:
            seen.append(m)
    known = available_methods("vit")
    for m in seen:
        if m not in known:
            method_info(m)             # SpecError naming an unknown method (with a close match)
            raise SpecError(f"method {m!r} cannot run in a ViT block; methods for 'vit': {known}")
    return seen


def feature_cosine(feats: np.ndarray, base: np.ndarray) -> float:
    """Mean over images of the cosine between reduced ``feats [B, F]`` and unreduced ``base [B, F]`` features
    (float64; a zero vector counts as cosine 0)."""
    a, b = np.asarray(feats, np.float64), np.asarray(base, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"feature shapes differ: {a.shape} vs {b.shape}")
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float(np.mean(np.where(den > 0, (a * b).sum(-1) / np.maximum(den, 1e-300), 0.0)))


def _point(backbone: Backbone, method: str, target: Optional[float], spec: Optional[dict], probe: RidgeProbe,
           images: np.ndarray, labels: np.ndarray, base_flops: int, base_acc: Optional[float],
           settings: SweepSettings, base_feats: Optional[np.ndarray] = None, sink: Optional[dict] = None) -> dict:
    """Evaluate one setting; every number in the returned row is measured, none is copied. ``feature_cos``: the
    cosine of its features (the probe's input, or the logits of a classifier) to ``base_feats``, the unreduced
    ones; ``sink["feats"]`` receives this point's features."""
    reducers = tuple(build_layer_reducers(backbone.cost.depth, spec))
    row = {"method": method, "target": target, "spec": json.dumps(spec, sort_keys=True) if spec else ""}
    analytic = backbone.flops(reducers)
    counts = backbone.token_counts(reducers)
    row.update(
        analytic_gflops=analytic / 1e9,
        flops_fraction=analytic / base_flops,
        capacity_gflops=analytic / 1e9,
        capacity_flops_fraction=analytic / base_flops,
        flop_count="static",
        tokens_per_layer=[a for a, _ in counts],
        final_tokens=counts[-1][1] if counts else backbone.cost.num_tokens,
    )
    if backbone.counts_valid(reducers):
        stats = valid_flop_stats(backbone, reducers, images, settings)
        row.update(stats, flop_count="valid",
                   analytic_gflops=stats["valid_gflops_mean"], flops_fraction=stats["valid_gflops_mean"] * 1e9 / base_flops)
    comp = measure.compile_setting(backbone.features, reducers, batch_size=settings.batch_size,
                                   image_size=backbone.image_size, params=backbone.params,
                                   mean=backbone.mean, std=backbone.std)
    row["compile_s"] = comp.compile_s
    elementwise = backbone.elementwise_flops(reducers)
    row["elementwise_gflops"] = elementwise / 1e9
    # XLA counts the compiled program, which runs at the static capacity: compare it with the capacity count.
    if comp.xla_flops_per_image is None:
        row.update(xla_gflops=None, xla_rel_diff=None, flops_flag="no cost analysis")
    else:
        rel = comp.xla_flops_per_image / (analytic + elementwise) - 1.0
        row.update(xla_gflops=comp.xla_flops_per_image / 1e9, xla_rel_diff=rel,
                   xla_rel_diff_matmul_only=comp.xla_flops_per_image / analytic - 1.0,
                   flops_flag="" if abs(rel) <= settings.flop_tolerance else f"XLA differs by {rel:+.1%}")
    start = time.perf_counter()
    feats = measure.extract(comp, images, seed=settings.seed)
    row["eval_s"] = time.perf_counter() - start
    if not np.all(np.isfinite(feats)):
        row["error"] = "non-finite features"
    if sink is not None:
        sink["feats"] = feats
    row["feature_cos"] = feature_cosine(feats, feats if base_feats is None else base_feats)
    acc = probe.accuracy(feats, labels)
    row["accuracy"] = acc
    row["acc_retained"] = acc / base_acc if base_acc else 1.0
    if settings.throughput_batch != settings.batch_size:
        comp = measure.compile_setting(backbone.features, reducers, batch_size=settings.throughput_batch,
                                       image_size=backbone.image_size, params=backbone.params,
                                   mean=backbone.mean, std=backbone.std)
    timing = measure.throughput(comp, images, warmup=settings.warmup, repeats=settings.repeats)
    row.update(images_per_s=timing.images_per_s, batch_ms=timing.median_batch_s * 1e3,
               throughput_batch=timing.batch_size)
    return row


def valid_token_counts(backbone: Backbone, reducers: tuple, images: np.ndarray, settings: SweepSettings) -> np.ndarray:
    """``[N, depth, 2]`` valid tokens entering each layer's attention and MLP, for each of the ``N`` images."""
    comp = measure.compile_setting(backbone.valid_counts, reducers, batch_size=settings.batch_size,
                                   image_size=backbone.image_size, params=backbone.params,
                                   mean=backbone.mean, std=backbone.std)
    return measure.extract(comp, images, seed=settings.seed)


def valid_flop_stats(backbone: Backbone, reducers: tuple, images: np.ndarray, settings: SweepSettings, *,
                     counts: Optional[np.ndarray] = None) -> dict:
    """FLOPs of a capacity-padded setting counted on the tokens each image keeps valid, over ``images`` (or the
    precomputed ``counts`` of :func:`valid_token_counts`).

    Returns ``valid_gflops_mean`` / ``_std`` / ``_min`` / ``_max`` (per image), ``valid_tokens_per_layer`` (mean
    valid attention tokens per layer) and ``final_tokens_valid`` (mean valid tokens after the last layer). The
    sweep reports the mean as the point's FLOPs; the static capacity count stays in ``capacity_gflops`` (what
    the jitted program computes, and what the XLA cross-check compares with)."""
    if counts is None:
        counts = valid_token_counts(backbone, reducers, images, settings)    # [N, depth, 2]
    per_image = np.asarray(backbone.cost.valid_flops(reducers, counts), np.float64) / 1e9
    return {
        "valid_gflops_mean": float(per_image.mean()), "valid_gflops_std": float(per_image.std()),
        "valid_gflops_min": float(per_image.min()), "valid_gflops_max": float(per_image.max()),
        "valid_tokens_per_layer": [float(v) for v in counts[:, :, 0].mean(0)],
        "final_tokens_valid": float(counts[:, -1, 1].mean()),
    }


class ArgmaxProbe:
    """The model's own logits: ``predict = argmax`` (``l2``/``val_accuracy`` are not applicable)."""

    l2 = float("nan")
    val_accuracy = float("nan")

    def predict(self, logits) -> np.ndarray:
        return np.argmax(np.asarray(logits), axis=-1)

    def accuracy(self, logits, labels) -> float:
        return float(np.mean(self.predict(logits) == np.asarray(labels)))


def fit_probe(backbone: Backbone, train_images: np.ndarray, train_labels: np.ndarray, *, num_classes: int,
              settings: SweepSettings) -> tuple[RidgeProbe, float]:
    """Extract unreduced training features and fit the ridge probe. Returns ``(probe, seconds)``.
    A classifier backbone gets :class:`ArgmaxProbe` instead (its own head decides)."""
    start = time.perf_counter()
    if backbone.classifier:
        return ArgmaxProbe(), 0.0
    comp = measure.compile_setting(backbone.features, (None,) * backbone.cost.depth,
                                   batch_size=settings.batch_size, image_size=backbone.image_size, params=backbone.params,
                                   mean=backbone.mean, std=backbone.std)
    feats = measure.extract(comp, train_images, seed=settings.seed)
    probe = fit_ridge_probe(feats, train_labels, num_classes=num_classes, l2_grid=settings.l2_grid)
    return probe, time.perf_counter() - start


def plan(backbone: Backbone, settings: SweepSettings) -> list[tuple[str, Optional[float], Optional[dict], str]]:
    """``[(method, target, spec | None, error)]``: the unreduced point first, then each method at each
    target as chosen by the budget solver (closest from below). Unreachable targets carry the error."""
    methods = resolve_methods(settings.methods)
    out: list = [("none", 1.0, None, "")]
    solved = budget.solve_all(list(settings.targets), backbone.cost, methods, dict(settings.options))
    for method in methods:
        for t in settings.targets:
            choice = solved[(method, float(t))]
            if isinstance(choice, Exception):
                out.append((method, float(t), None, str(choice)))
            else:
                out.append((method, float(t), choice.spec, ""))
    return out


def run_sweep(backbone: Backbone, train: tuple, test: tuple, *, num_classes: int, settings: SweepSettings,
              progress: bool = True) -> dict:
    """Fit the probe once, then evaluate every planned point. Returns ``{"points": [...], "meta": {...}}``.

    A method that fails (its builder, the model, or compilation raises) gets a row with ``error`` set
    and no numbers; the sweep continues.
    """
    from tqdm.auto import tqdm

    resolve_methods(settings.methods)      # an unknown method raises SpecError before the probe is fitted
    if progress and not backbone.classifier:
        print(f"[eval] unreduced features of {len(train[0])} training images -> ridge probe ...", flush=True)
    probe, probe_s = fit_probe(backbone, *train, num_classes=num_classes, settings=settings)
    base_flops = backbone.flops((None,) * backbone.cost.depth)
    points = []
    base_acc = None
    base_feats = None
    todo = plan(backbone, settings)
    bar = tqdm(todo, desc=f"sweep {backbone.name}", disable=not progress, unit="pt")
    for method, target, spec, err in bar:
        bar.set_postfix_str(f"{method}@{target}")
        if err:
            points.append({"method": method, "target": target, "spec": "", "error": err})
            continue
        try:
            sink: dict = {}
            row = _point(backbone, method, target, spec, probe, test[0], test[1], base_flops, base_acc, settings,
                         base_feats=base_feats, sink=sink)
            if method == "none":
                base_feats = sink.get("feats")
        except Exception as exc:  # noqa: BLE001 - one broken method must not hide the others' results
            row = {"method": method, "target": target, "spec": json.dumps(spec, sort_keys=True) if spec else "",
                   "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        if method == "none" and "accuracy" in row:
            base_acc = row["accuracy"]
            row["acc_retained"] = 1.0
        points.append(row)
    meta = {
        "backbone": backbone.name,
        "image_size": backbone.image_size,
        "cost_model": backbone.cost.describe(),
        "base_gflops": base_flops / 1e9,
        "base_accuracy": base_acc,
        "metric": "classifier accuracy (own head)" if backbone.classifier else "linear-probe accuracy (ridge)",
        "probe_l2": probe.l2,
        "probe_val_accuracy": probe.val_accuracy,
        "probe_fit_s": probe_s,
        "num_train": int(len(train[0])),
        "num_test": int(len(test[0])),
        "batch_size": settings.batch_size,
        "throughput_batch": settings.throughput_batch,
        "repeats": settings.repeats,
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "flop_convention": ("FLOPs = 2 x MACs (matrix products); capacity-padded methods (flop_count='valid') are "
                            "counted on each image's valid tokens (mean over the test set), their static capacity "
                            "count in capacity_gflops; XLA cost_analysis flops per image (at capacity) as cross-check"),
        "flop_tolerance": settings.flop_tolerance,
    }
    return {"points": points, "meta": meta, "probe": probe}
