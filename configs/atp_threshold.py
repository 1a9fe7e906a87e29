"""ATP threshold training with a budget loss (reduction.nnx.ATPModule) on the generated VQA set.

Trains only the ATP threshold MLP (``optim.trainable``) with soft keep masks in the forward pass and
``loss = task loss + budget_weight * budget_loss(mask, target_keep)``. The soft-mask forward needs the
ATP module wired into a model's attention; ``train.py`` raises a clear NotImplementedError until a model
exposes that hook (see docs/training.md).
"""

import ml_collections

from configs.vlm_connector import get_config as _vlm


def get_config():
    c = _vlm()
    c.config_name = "atp_threshold"
    c.model.atp = ml_collections.ConfigDict(dict(layer=1, capacity_ratio=0.5, hidden=16, temperature=10.0,
                                                 target_keep=0.5, budget_weight=1.0, init_theta=0.3))
    c.optim.trainable = ("atp",)
    c.optim.lr = 1e-3
    c.train.steps = 500
    return c
