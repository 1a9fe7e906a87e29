"""FLOPs counted on the tokens each image keeps valid (capacity-padded, instance-adaptive methods such as ATP).

The reference here is written out by hand from the block formula (qkv, logits, weighted values, projection, MLP),
independently of ``reduction.flops``; the counts are checked against the final validity mask.
"""

import numpy as np
import pytest

import reduction as R
from evaluation import measure
from evaluation.builtin import vit_backbone
from evaluation.sweep import SweepSettings, valid_flop_stats, valid_token_counts
from models.vit import ViT, ViTConfig, make_forward

_CFG = ViTConfig(width=32, depth=2, heads=2, mlp_dim=64, patch_size=7, image_size=28, layer_scale=0.1)
_SPEC = {"method": "atp", "keep_ratio": 0.75, "layers": [1], "theta": 0.9, "stride": 0}


def _model():
    m = ViT.from_config(_CFG, seed=0)
    for blk in m.blocks:                 # sharper attention than at init, so the ATP scores spread out
        blk.attn.qkv.kernel[...] = blk.attn.qkv.kernel[...] * 4.0
    return m


def _by_hand(attn_tokens, mlp_tokens, *, atp_input):
    """Loop reference: per block 2 x MACs of qkv (3TC^2), logits and weighted values (2T^2C), projection (TC^2),
    MLP (2TCM); patch embedding; ATP's own averaging of its input's attention rows (heads x (T+1) x T)."""
    c, m, h, p = _CFG.width, _CFG.mlp_dim, _CFG.heads, _CFG.patch_size
    total = 2 * 16 * 3 * p * p * c
    for a, t in zip(attn_tokens, mlp_tokens):
        total += 2 * (3 * a * c * c + 2 * a * a * c + a * c * c) + 2 * 2 * t * c * m
    return total + h * (atp_input + 1) * atp_input


def test_valid_flops_count_each_images_kept_tokens():
    model = _model()
    reds = model.build_reducers(_SPEC)
    x = np.random.default_rng(0).normal(size=(6, 28, 28, 3)).astype(np.float32)
    _, aux = make_forward(model, reds)(x)
    counts = np.asarray(aux["valid_tokens_per_layer"])                      # [B, depth, 2]
    kept = np.asarray(aux["valid"]).sum(1)
    assert counts.shape == (6, 2, 2) and len(set(kept.tolist())) > 1        # the images keep different counts
    assert (counts[:, 1, 1] == kept).all()                                  # pruning after block 1's attention
    assert (counts[:, 0] == 17).all() and (counts[:, 1, 0] == 17).all()
    flops = model.valid_flops(counts, 28, reds)
    for i in range(6):
        assert flops[i] == _by_hand([17, 17], [17, int(kept[i])], atp_input=17)
    order = np.argsort(kept)
    assert (np.diff(flops[order]) >= 0).all() and flops[order[0]] < flops[order[-1]]
    # the static capacity (13 tokens) bounds them all, and the static schedule gives exactly ViT.flops
    static = np.array([[(a, t) for a, t in model.tokens_per_layer(28, reds)]])
    assert model.valid_flops(static, 28, reds)[0] == model.flops(28, reds) == _by_hand([17, 17], [17, 13],
                                                                                          atp_input=17)
    assert (flops <= model.flops(28, reds)).all()
    with pytest.raises(ValueError, match="counts must be"):
        model.valid_flops(counts[:, :1], 28, reds)


@pytest.mark.long
def test_sweep_counts_valid_tokens_for_adaptive_methods_and_xla_checks_capacity():
    model = _model()
    bb = vit_backbone(model, image_size=28, name="tiny")
    atp = tuple(R.build_layer_reducers(2, _SPEC))
    tome = tuple(R.build_layer_reducers(2, {"method": "tome", "r": 2}))
    assert bb.counts_valid(atp) and not bb.counts_valid(tome) and not bb.counts_valid((None,) * 2)
    images = np.random.default_rng(1).integers(0, 255, (7, 28, 28), dtype=np.uint8)
    settings = SweepSettings(batch_size=4)
    counts = valid_token_counts(bb, atp, images, settings)
    assert counts.shape == (7, 2, 2) and len(set(counts[:, 1, 1].tolist())) > 1
    stats = valid_flop_stats(bb, atp, images, settings, counts=counts)
    per_image = [_by_hand([17, 17], [17, k], atp_input=17) for k in counts[:, 1, 1]]
    assert stats["valid_gflops_mean"] == pytest.approx(np.mean(per_image) / 1e9, rel=1e-12)
    assert stats["valid_gflops_max"] <= bb.flops(atp) / 1e9 and stats["final_tokens_valid"] == pytest.approx(
        counts[:, 1, 1].mean())
    # XLA counts the compiled program at capacity: the check compares it with the capacity count
    feats = measure.compile_setting(bb.features, atp, batch_size=4, image_size=28, params=bb.params)
    assert abs(feats.xla_flops_per_image / (bb.flops(atp) + bb.elementwise_flops(atp)) - 1) < 0.05
