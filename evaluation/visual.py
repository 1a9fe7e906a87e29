"""Where the tokens went: merge groups and pruned patches on sample images.

For each method's most reduced point, the backbone is run with source tracking (``source [B, N]`` =
final token holding each original token, ``-1`` if pruned). Each patch is tinted with a colour per final
token (patches merged together share a colour, group borders drawn in white) and pruned patches are
blacked out. One PNG: rows = sample images, columns = unreduced + one per method.
"""

from __future__ import annotations

import json
import pathlib

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.data import to_rgb  # noqa: E402
from reduction.reducers import build_layer_reducers  # noqa: E402


def render_groups(image: np.ndarray, groups: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """``image [S, S] in [0, 1]``, ``groups [g, g]`` int (``-1`` pruned) -> RGB ``[S, S, 3]``.

    Every group id gets a colour (fixed by ``seed``), blended 50/50 with the image; pruned cells are
    black; cells whose right/lower neighbour is in another group get a white border line."""
    s = image.shape[0]
    g = groups.shape[0]
    cell = s // g
    palette = np.random.default_rng(seed).uniform(0.15, 1.0, size=(int(groups.max()) + 2, 3))
    big = np.kron(groups, np.ones((cell, cell), groups.dtype))
    rgb = 0.5 * np.repeat(image[: g * cell, : g * cell, None], 3, -1) + 0.5 * palette[np.maximum(big, 0)]
    rgb[big < 0] = 0.0
    edge_x = np.zeros_like(big, bool)
    edge_x[:, :-1] = big[:, :-1] != big[:, 1:]
    edge_y = np.zeros_like(big, bool)
    edge_y[:-1] = big[:-1] != big[1:]
    rgb[edge_x | edge_y] = 1.0
    return np.clip(rgb, 0.0, 1.0)


def token_groups(backbone, spec, images: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """``uint8 [B, h, w]`` images -> ``[B, g, g]`` final-token id of every patch (``-1`` = pruned)."""
    reducers = tuple(build_layer_reducers(backbone.cost.depth, spec))
    x = to_rgb(images, backbone.image_size, backbone.mean, backbone.std)
    source = np.asarray(backbone.source_map(backbone.params, x, reducers, jax.random.PRNGKey(seed)))
    g = int(round(np.sqrt(backbone.cost.num_candidates)))
    return source[:, backbone.cost.num_protected:].reshape(len(images), g, g)


def save_visualisations(backbone, result: dict, test: tuple, out_dir: pathlib.Path, cfg, *,
                        num_images: int = 4) -> dict:
    """Write ``token_groups.png``; returns ``{}`` when the backbone cannot report a source map."""
    if backbone.source_map is None:
        return {}
    images = np.asarray(test[0][:num_images])
    cols = [("unreduced", None)]
    deepest: dict = {}
    shown = tuple(getattr(cfg, "visualize_methods", ("all",)) or ("all",))
    for p in result["points"]:
        if p.get("error") or p["method"] == "none" or not p.get("spec"):
            continue
        if "all" not in shown and p["method"] not in shown:
            continue
        if p["method"] not in deepest or p["flops_fraction"] < deepest[p["method"]]["flops_fraction"]:
            deepest[p["method"]] = p
    for method in sorted(deepest):
        p = deepest[method]
        cols.append((f"{method}\n{p['flops_fraction']:.2f} FLOPs, {p['final_tokens']} tok", json.loads(p["spec"])))
    grey = np.stack([np.asarray(jax.image.resize(im.astype(np.float32) / 255.0, (backbone.image_size,) * 2,
                                                 "bilinear")) for im in images])
    fig, axes = plt.subplots(len(images), len(cols), figsize=(1.9 * len(cols), 2.0 * len(images)), dpi=110,
                             squeeze=False)
    for j, (title, spec) in enumerate(cols):
        try:
            groups = token_groups(backbone, spec, images, seed=cfg.seed)
        except Exception as exc:  # noqa: BLE001 - one method failing to visualise must not stop the rest
            groups = None
            title = f"{title}\n(no source map: {type(exc).__name__})"
        for i in range(len(images)):
            ax = axes[i, j]
            ax.axis("off")
            if groups is not None:
                ax.imshow(render_groups(grey[i], groups[i], seed=i))
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    path = pathlib.Path(out_dir) / "token_groups.png"
    fig.savefig(path)
    plt.close(fig)
    return {"token_groups": path}
