"""VLM sweep on real weights: DINOv2-small -> trained projector -> SmolLM2-135M-Instruct (``configs/vlm_smol.py``).

Methods x budgets (keep 1/3, 2/9, 1/9 of the image tokens) at the three insertion points, on the generated VQA
validation split: accuracy, analytic and XLA FLOPs, prefill and per-token decode time, KV-cache bytes
(:mod:`evaluation.vlm_sweep`).

    python eval.py --config eval_vlm_smol                                  # the shipped projector
    python eval.py --config eval_vlm_smol projector=runs/vlm_smol          # the projector of your own run
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.config_name = "eval_vlm_smol"
    c.kind = "vlm"
    c.train_config = "vlm_smol"          # the model and data come from this training preset ...
    c.train_overrides = ()               # ... with these overrides (e.g. ("data.eval_size=300",))
    c.projector = "pretrained/vlm_smol/projector.npz"   # .npz (evaluation.vlm_sweep.export_projector) or a run dir
    c.num_test = 150
    c.batch_size = 25
    c.fractions = (1 / 3, 2 / 9, 1 / 9)
    c.llm_layer = 2                      # in-LLM reducers act before this layer
    c.methods = ml_collections.ConfigDict(dict(
        vision=("random", "tome", "pitome", "topk_cls", "divprune"),
        connector=("random", "pool", "tome", "divprune"),
        llm=("random", "dart", "fastv", "divprune"),
    ))
    c.options = ml_collections.ConfigDict()   # fixed options per method, e.g. options.dart.num_image_pivots=2
    c.repeats = 3
    c.decode_steps = 4                   # 0 = no decode timing
    c.xla_check = True
    c.out_dir = ""
    return c
