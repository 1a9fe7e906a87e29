"""Trade-off plots (matplotlib, Agg): accuracy vs GFLOPs and accuracy vs throughput, one line per method."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(points: list, x_key: str) -> dict:
    by_method: dict = {}
    for p in points:
        if p.get("error") or p.get("accuracy") is None or p.get(x_key) is None:
            continue
        by_method.setdefault(p["method"], []).append((p[x_key], 100 * p["accuracy"]))
    return {m: sorted(v) for m, v in by_method.items()}


def _plot(points: list, x_key: str, xlabel: str, title: str, path: pathlib.Path) -> pathlib.Path:
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    base = [p for p in points if p["method"] == "none" and p.get("accuracy") is not None]
    for method, pts in sorted(_series(points, x_key).items()):
        if method == "none":
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=method)
    if base and base[0].get(x_key) is not None:
        ax.scatter([base[0][x_key]], [100 * base[0]["accuracy"]], marker="*", s=160, color="k",
                   label="unreduced", zorder=5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("probe accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_all(result: dict, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    name = result["meta"]["backbone"]
    return {
        "pareto_flops": _plot(result["points"], "analytic_gflops", "GFLOPs per image (2 x MACs)",
                              f"{name}: accuracy vs FLOPs", out_dir / "accuracy_vs_gflops.png"),
        "pareto_throughput": _plot(result["points"], "images_per_s",
                                   f"images/s (batch {result['meta']['throughput_batch']}, {result['meta']['device']})",
                                   f"{name}: accuracy vs throughput", out_dir / "accuracy_vs_throughput.png"),
    }
