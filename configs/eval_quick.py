"""Tiny smoke sweep (CI, tests): DINOv2-small at 56 px, a few images, two methods, one budget."""

import ml_collections

from configs.eval_dinov2_fmnist import get_config as _default


def get_config() -> ml_collections.ConfigDict:
    cfg = _default()
    cfg.config_name = "eval_quick"
    cfg.image_size = 56
    cfg.num_train = 120
    cfg.num_test = 40
    cfg.methods = ("tome", "topk_cls")
    cfg.options = ml_collections.ConfigDict()   # fixed options per method, e.g. options.zerotprune.iterations=3
    cfg.targets = (0.6,)
    cfg.batch_size = 20
    cfg.throughput_batch = 20
    cfg.repeats = 2
    cfg.probe_l2_grid = (1.0, 100.0)
    cfg.visualize = False
    return cfg
