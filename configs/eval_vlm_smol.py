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
    c.num_test = 100
    c.batch_size = 25
    c.fractions = (1 / 3, 2 / 9, 1 / 9)
    c.llm_layer = 2                      # in-LLM reducers act before this layer
    # the default set fits the 15-minute CPU budget; any registered method of a point can be added, e.g.
    # methods.vision="('random','tome','pitome','topk_cls','vispruner','divprune')"
    c.methods = ml_collections.ConfigDict(dict(
        vision=("tome", "visionzip"),
        connector=("random", "pool", "divprune"),
        llm=("dart", "fastv"),
    ))
    # DART's budget rule keeps num_image_pivots + P * (budget // P) tokens (P = all pivots); the reference's 4 + 4
    # pivots are sized for 576 image tokens, so at 65 the sweep halves them (2 + 2) to stay near each budget
    c.options = ml_collections.ConfigDict(dict(dart=ml_collections.ConfigDict(dict(num_image_pivots=2,
                                                                                 num_text_pivots=2))))
    # trained weights of learned methods (evaluation.learned): a folder with learned.npz + config.json, a train.py run
    # dir, or "init" (the untrained module); a learned method in `methods` without one raises LearnedReducerError
    c.learned = ml_collections.ConfigDict(dict(delete_gate=""))
    c.repeats = 0                        # 0: time the evaluation batches after the first; n > 0: n extra calls
    c.decode_steps = 0                   # > 0: also time decode steps (bench/bench_vlm.py does, at batch 8)
    c.xla_check = True
    c.out_dir = ""
    return c
