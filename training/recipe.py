"""On-device parts of the DeiT training recipe: Mixup / CutMix with soft (label-smoothed) targets, and the
exponential moving average of the parameters (model EMA).

Mixup / CutMix follow timm's ``Mixup`` in its default ``mode="batch"``: one draw per batch decides whether the
batch is mixed at all (``prob``) and, when both are on, CutMix (probability ``switch_prob``) or Mixup; the batch is
mixed with itself reversed (row ``i`` with row ``B - 1 - i``). Mixup draws ``lam ~ Beta(mixup_alpha, mixup_alpha)``
and blends the images; CutMix draws ``lam ~ Beta(cutmix_alpha, cutmix_alpha)``, pastes a box of side
``sqrt(1 - lam)`` times the image side (centre uniform over the image, clipped at the border) from the reversed
batch, and resets ``lam`` to the uncovered fraction of the image. The targets are
``lam * smooth(y) + (1 - lam) * smooth(y_reversed)`` with ``smooth`` = label smoothing (``optax.smooth_labels``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

MIX_SALT = 0x6D69   # fold_in constant: the mixing key, apart from the reducers' per-layer keys


@dataclasses.dataclass(frozen=True)
class MixConfig:
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    @property
    def active(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


def cutmix_box(key, h: int, w: int, lam):
    """``(top, bottom, left, right)`` int32 bounds of the CutMix box for ``lam`` (half-open, clipped to the image):
    side ``floor(H * sqrt(1 - lam))`` x ``floor(W * sqrt(1 - lam))`` around a centre uniform over the pixels."""
    cut = jnp.sqrt(1.0 - lam)
    ch = jnp.floor(h * cut).astype(jnp.int32)
    cw = jnp.floor(w * cut).astype(jnp.int32)
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (), 0, h)
    cx = jax.random.randint(kx, (), 0, w)
    top, bottom = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    left, right = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    return top, bottom, left, right


def mix_batch(key, images, labels, num_classes: int, smoothing: float, mix: MixConfig):
    """``images [B, H, W, C]`` float, ``labels [B]`` int -> ``(mixed images, targets [B, classes], lam, is_cutmix)``.

    ``targets`` rows sum to 1; ``lam`` is the weight of each row's own label (the uncovered area under CutMix)."""
    b, h, w = images.shape[:3]
    k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
    apply = jax.random.uniform(k_apply) < mix.prob
    if mix.mixup_alpha > 0 and mix.cutmix_alpha > 0:
        use_cut = jax.random.uniform(k_switch) < mix.switch_prob
    else:
        use_cut = jnp.asarray(mix.cutmix_alpha > 0)
    lam_mix = jax.random.beta(k_mix, mix.mixup_alpha, mix.mixup_alpha) if mix.mixup_alpha > 0 else jnp.ones(())
    lam_cut = jax.random.beta(k_cut, mix.cutmix_alpha, mix.cutmix_alpha) if mix.cutmix_alpha > 0 else jnp.ones(())
    top, bottom, left, right = cutmix_box(k_box, h, w, lam_cut)
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)      # [H, W]
    lam_box = 1.0 - jnp.sum(inside).astype(jnp.float32) / (h * w)
    lam = jnp.where(apply, jnp.where(use_cut, lam_box, lam_mix), 1.0).astype(jnp.float32)
    flipped = images[::-1]
    blended = images * lam.astype(images.dtype) + flipped * (1.0 - lam).astype(images.dtype)
    pasted = jnp.where(inside[None, :, :, None], flipped, images)
    out = jnp.where(apply & use_cut, pasted, jnp.where(apply, blended, images))
    y = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    targets = lam * y + (1.0 - lam) * y[::-1]
    return out, targets, lam, apply & use_cut


def ema_update(ema, params, decay: float):
    """``decay * ema + (1 - decay) * params`` leaf by leaf (timm's ModelEmaV2 update, no warm-up)."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params)
