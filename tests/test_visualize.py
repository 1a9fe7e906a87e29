"""evaluation.visualize: the merge map has one colour group per token at the chosen layer."""

import numpy as np
from PIL import Image

from evaluation.visualize import draw_groups, sample_image, visualize
from models.vit import ViT


def _count_regions(pic: np.ndarray, patch: int) -> int:
    """Distinct fill colours of patch interiors (mean-colour mode; borders excluded)."""
    centres = pic[patch // 2::patch, patch // 2::patch].reshape(-1, 3)
    return len({tuple(c) for c in centres})


def test_visualize_tome_groups_equal_token_count(tmp_path):
    model = ViT.from_config(dict(width=32, depth=3, mlp_dim=48, heads=2, patch_size=8, image_size=64))
    image = sample_image(64)
    out = tmp_path / "vis.png"
    pic, summary = visualize(model, image, {"method": "tome", "r": 10}, layer=1, mode="random", out=str(out))
    assert out.exists() and Image.open(out).size == (64, 64)
    # 65 tokens -> 55 -> 45 after layer 1; all merges leave the class token alone.
    assert summary["tokens"] == 45 and summary["groups"] == 45 - 1 and summary["pruned"] == 0
    assert _count_regions(np.asarray(Image.open(out)), 8) == summary["groups"]


def test_pruned_patches_are_grey_and_borders_drawn():
    img = np.full((16, 16, 3), 200, np.uint8)
    img[:, 8:] = (255, 0, 0)
    groups = np.array([[0, 1], [-1, 1]])
    pic = np.asarray(draw_groups(img, groups))
    assert tuple(pic[12, 3]) == (117, 117, 117)  # pruned: 0.25 * 200 + 0.75 * 90 (rounded down)
    assert tuple(pic[3, 12]) == (255, 0, 0)
    assert tuple(pic[3, 8]) == (20, 20, 20)  # border between groups 0 and 1


def test_tokens_pruned_through_the_validity_mask_are_drawn_pruned_and_counted():
    """ATP keeps a static capacity of slots and turns some off with ``valid``; those patches are pruned too
    (before, they were drawn as kept and left out of ``pruned``)."""
    import jax.numpy as jnp

    from models.vit import make_forward

    model = ViT.from_config(dict(width=16, depth=1, mlp_dim=16, heads=2, patch_size=8, image_size=64))
    qkv = model.blocks[0].attn.qkv.kernel
    qkv[...] = qkv[...] * 30.0             # peaked attention: an untrained ViT's is near uniform (every score ~1)
    image = sample_image(64)
    spec = {"method": "atp", "layers": (0,), "theta": 0.3, "keep_ratio": 0.9}
    pic, summary = visualize(model, image, spec, layer=0)
    # reference: loop over patches, read the slot each one went to and whether that slot is valid
    reducers = tuple(model.build_reducers(spec))
    _, aux = make_forward(model, reducers, return_source=True)(jnp.asarray(image[None] / 255.0, jnp.float32))
    source, valid = np.asarray(aux["source"])[0], np.asarray(aux["valid"])[0]
    pruned = [n for n in range(64) if source[1 + n] < 0 or not valid[source[1 + n]]]
    assert summary["slots"] == 1 + 57 and summary["tokens"] == int(valid.sum()) < summary["slots"]
    assert summary["pruned"] == len(pruned) > 64 - 57                  # more than the capacity alone drops
    assert summary["groups"] == 64 - len(pruned)
    pic = np.asarray(pic).astype(int)
    grey = (0.25 * image.astype(np.float32) + 0.75 * 90.0).astype(int)
    for n in range(64):
        r, c = divmod(n, 8)
        y, x = 8 * r + 4, 8 * c + 4
        assert (tuple(pic[y, x]) == tuple(grey[y, x])) == (n in pruned), n


def test_default_sample_image_shows_something():
    img = sample_image(224).astype(np.float32)
    assert img.shape == (224, 224, 3)
    near_white = (img.min(-1) > 230).mean()
    textured = (img.reshape(14, 16, 14, 16, 3).std(axis=(1, 3)).max(-1) > 5).mean()
    assert near_white < 0.3 and textured > 0.5, (near_white, textured)   # before: 0.98 white, 4% textured
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 1000
