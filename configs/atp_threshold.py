"""Learned ATP thresholds (reduction.nnx.LearnedATP, an ordinary learned reducer) inside the CPU-sized Fashion-MNIST ViT, with a budget loss.

Two-step recipe (pretrain, then learn the thresholds while the backbone adapts to the pruning):

    python train.py --config vit_fmnist                                          # -> runs/vit_fmnist
    python train.py --config atp_threshold model.pretrained=runs/vit_fmnist      # ATP + backbone, 400 steps

Thresholds only, backbone frozen: add ``model.atp.train_backbone=auto`` (with ``model.pretrained`` set only the
learned reducers train: ``optim.trainable`` becomes ``("^learned/",)``, recorded in ``config.json``) or ``=no``. From
scratch (``model.pretrained=""``) everything trains. An explicit ``optim.trainable=...`` always wins.

What runs: one ATP module after the attention of block 1 of the 4-block ViT (17 tokens: class token + 4x4
patches; ``model.atp.layers=(1,2)`` adds block 2). Training uses soft masks (no token dropped; the later blocks
gate keys with ``log m``; with ``straight_through=True``, the default, the forward pass gates with the hard
0/1 keep set that evaluation uses and the gradient flows through the soft mask) and minimises ``CE + budget_weight * |mean soft kept fraction - target_keep|`` per ATP
layer. The budget term is normalised by the candidate count (16 patches), i.e. it is a kept *fraction*, so
``budget_weight=2`` makes one point of keep ratio cost 0.02 nats, far above the CE gain of keeping a few more
tokens. Evaluation prunes hard to the static capacity ``1 + floor(16 * 0.7) = 12`` tokens with a validity mask
(an instance keeps fewer when fewer patches pass its threshold) and logs ``eval_kept_ratio_L1``. The threshold
MLP's updates are scaled by 10 (``optim.lr_scales``; it has to move the threshold logit by O(1) in a few hundred steps).
Measured from the 88.15% backbone (docs/training.md has the table): this preset keeps 0.50 of the patches after
block 1 at 85.1% test accuracy; soft masks with a frozen backbone (``straight_through=False
train_backbone=auto``) meet the budget too but reach only 64.3% under hard pruning.
"""

import ml_collections

from configs.vit_fmnist import get_config as _vit_fmnist


def get_config():
    c = _vit_fmnist()
    c.config_name = "atp_threshold"
    c.model.reduction.method = "none"   # no static reducer: the ATP modules are the only reduction
    c.model.atp = ml_collections.ConfigDict(dict(
        layers=(1,),            # blocks with an ATP module (after their attention)
        capacity_ratio=0.7,     # hard-mode static capacity: keep_count(T, 0.7, protected=1)
        stride=4,               # spatial grid of always-kept patches (0 = none)
        hidden=16,              # threshold MLP width
        temperature=10.0,       # soft mask sigmoid((score - theta) * temperature)
        straight_through=True,  # forward gates with the hard keep set, gradients through the soft mask
        init_theta=0.3,         # initial threshold
        self_weight=0.5,        # score = w * self + (1 - w) * cross (class token)
        target_keep=0.5,        # budget: kept fraction of the 49 patch candidates
        budget_weight=2.0,      # weight of the (candidate-normalised) budget loss, summed over ATP layers
        budget_kind="abs",      # "abs" | "square"
        features="stats",       # threshold MLP inputs: "stats" (5 pooled score statistics) | "stats+cls" (+ class token)
        train_backbone="yes",   # "yes" (backbone adapts too) | "auto" (frozen iff model.pretrained is set) | "no"
    ))
    c.train.steps = 400
    c.train.eval_every = 200
    c.train.log_every = 25
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 40
    c.optim.lr_scales = (("^learned/", 10.0),)   # the learned reducers step 10x the backbone learning rate
    c.checkpoint.every = 200
    return c
