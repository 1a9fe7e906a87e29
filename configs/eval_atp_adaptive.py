"""Learned ATP thresholds in effect: kept-token distribution, constant-threshold and static controls at equal FLOPs.

    python train.py --config vit_fmnist                                        # -> runs/vit_fmnist
    python train.py --config atp_threshold model.pretrained=runs/vit_fmnist    # -> runs/atp_threshold
    python eval.py --config eval_atp_adaptive checkpoint=runs/atp_threshold    # -> results/atp_adaptive/atp_threshold

``evaluation.atp_adaptive`` has what is measured. FLOPs are counted per image on its valid tokens.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.config_name = "eval_atp_adaptive"
    c.kind = "atp_adaptive"
    c.checkpoint = "runs/atp_threshold"    # a train.py run with model.atp (learned ATP reducers)
    c.num_test = 0                         # 0 = the whole Fashion-MNIST test split (10,000 images)
    c.seed = 0                             # subset seed when num_test > 0
    c.batch_size = 500
    c.bisection_steps = 24                 # constant-threshold search (mean kept count vs the learned one)
    c.static_methods = ("topk_cls", "random")   # static controls at the learned mean count (besides ATP's own top-K)
    c.out_dir = ""                         # "" = results/atp_adaptive/<checkpoint folder name>
    return c
