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
