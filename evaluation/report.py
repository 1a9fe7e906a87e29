"""Writing sweep results: JSON (everything), CSV (one row per point), a markdown table."""

from __future__ import annotations

import csv
import json
import math
import pathlib
from typing import Optional

COLUMNS = ("method", "target", "flops_fraction", "analytic_gflops", "flop_count", "capacity_flops_fraction",
           "capacity_gflops", "valid_gflops_std", "valid_gflops_min", "valid_gflops_max", "valid_tokens_per_layer",
           "final_tokens_valid", "elementwise_gflops", "xla_gflops", "xla_rel_diff",
           "xla_rel_diff_matmul_only", "flops_flag",
           "accuracy", "acc_retained", "feature_cos", "images_per_s", "batch_ms", "throughput_batch", "final_tokens",
           "tokens_per_layer", "compile_s", "eval_s", "spec", "error")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_json(result: dict, path: pathlib.Path) -> pathlib.Path:
    path.write_text(json.dumps({"meta": result["meta"], "points": result["points"]}, indent=2, sort_keys=True))
    return path


def write_csv(points: list, path: pathlib.Path) -> pathlib.Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for p in points:
            w.writerow([_cell(p.get(c)) for c in COLUMNS])
    return path


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value * scale, spec)


def best_per_target(points: list) -> dict:
    """``{target: row}``: the most accurate reduced method at each target (ties: the faster one)."""
    best: dict = {}
    for p in points:
        if p["method"] == "none" or p.get("accuracy") is None or p.get("error"):
            continue
        cur = best.get(p["target"])
        key = (p["accuracy"], p.get("images_per_s") or 0.0)
        if cur is None or key > (cur["accuracy"], cur.get("images_per_s") or 0.0):
            best[p["target"]] = p
    return best


def _tokens_out(p: dict) -> str:
    """Final tokens: the static count, and for a valid-counted point the mean valid count after it."""
    out = str(p.get("final_tokens", "-"))
    if p.get("final_tokens_valid") is not None:
        out += f" ({p['final_tokens_valid']:.1f} valid)"
    return out


def markdown_table(result: dict) -> str:
    meta, points = result["meta"], result["points"]
    lines = [
        f"# Token reduction sweep: {meta['backbone']} ({meta['image_size']} px)",
        "",
        (f"Linear probe (ridge, l2={meta['probe_l2']:g}) fitted once on unreduced features of {meta['num_train']} "
         f"training images; accuracy on {meta['num_test']} test images. "
         if meta.get("metric", "linear").startswith("linear") else
         f"Accuracy of the trained classifier's own head on {meta['num_test']} test images. ")
        + f"Unreduced: {_fmt(meta['base_accuracy'], '.2f', 100)}% at {meta['base_gflops']:.3f} GFLOPs/image.",
        f"FLOPs = 2 x MACs over the matrix products (GFLOPs column; the budget solver uses this count), "
        f"from the model's static token schedule; for a capacity-padded method (ATP, tokencorr: count `valid`) "
        f"from the tokens each test image keeps valid, averaged (the static capacity count in `cap. frac`). XLA = "
        f"`jax.jit(f).lower(x).compile().cost_analysis()['flops']` / batch, compared with GFLOPs plus a stated "
        f"elementwise estimate at the static capacity (LayerNorm, softmax, GELU, bias and residual adds in XLA's counting; "
        f"`evaluation.builtin.vit_elementwise_flops`); diff = XLA / (GFLOPs + elementwise) - 1, flagged beyond "
        f"{meta['flop_tolerance']:.0%}. Throughput: median of {meta['repeats']} timed runs after warm-up, "
        f"batch {meta['throughput_batch']}, device {meta['device']}. feat cos = mean cosine of each test image's "
        f"features (the probe's input; a classifier's logits) to its unreduced ones.",
        "",
        "| method | target | FLOPs frac | count | cap. frac | GFLOPs | XLA GFLOPs | diff | accuracy % | retained % "
        "| feat cos | img/s | tokens out | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        note = p.get("error") or p.get("flops_flag") or ""
        lines.append(
            f"| {p['method']} | {_fmt(p.get('target'), '.2f')} | {_fmt(p.get('flops_fraction'), '.3f')} | "
            f"{p.get('flop_count', '-')} | {_fmt(p.get('capacity_flops_fraction'), '.3f')} | "
            f"{_fmt(p.get('analytic_gflops'), '.3f')} | {_fmt(p.get('xla_gflops'), '.3f')} | "
            f"{_fmt(p.get('xla_rel_diff'), '+.1f', 100)}% | {_fmt(p.get('accuracy'), '.2f', 100)} | "
            f"{_fmt(p.get('acc_retained'), '.1f', 100)} | {_fmt(p.get('feature_cos'), '.3f')} | "
            f"{_fmt(p.get('images_per_s'), '.1f')} | {_tokens_out(p)} | {note} |"
        )
    best = best_per_target(points)
    if best:
        lines += ["", "Best method per FLOP target:", ""]
        for t in sorted(best, reverse=True):
            p = best[t]
            lines.append(f"- {t:.2f}: **{p['method']}** {100 * p['accuracy']:.2f}% "
                         f"({100 * p['acc_retained']:.1f}% of unreduced) at {p['flops_fraction']:.3f} of the FLOPs")
    flagged = [p for p in points if p.get("flops_flag")]
    lines += ["", f"Analytic vs XLA FLOP disagreements beyond tolerance: {len(flagged)}"]
    for p in flagged:
        lines.append(f"- {p['method']} @ {p['target']}: {p['flops_flag']}")
    errors = [p for p in points if p.get("error")]
    if errors:
        lines += ["", "Points without results:"]
        lines += [f"- {p['method']} @ {p['target']}: {p['error']}" for p in errors]
    return "\n".join(lines) + "\n"


def write_all(result: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_json(result, out_dir / "points.json"),
        "csv": write_csv(result["points"], out_dir / "points.csv"),
    }
    md = out_dir / "table.md"
    md.write_text(markdown_table(result))
    paths["markdown"] = md
    return paths
