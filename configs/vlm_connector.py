"""VLM connector training on the generated multi-object VQA set (``data.synth_vqa``).

A small LLaVA-style VLM (CLIP-style tower, 2-layer MLP projector, Llama LM whose vocabulary is the question
words + answers + the image token). Only the projector trains by default (``optim.trainable``); the answer
is read from the logits at the last prompt position, restricted to the answer words. Token reduction sits
at the VLM plan (``model.plan``): e.g. ``model.plan.point=connector model.plan.method=pool model.plan.k=2``
pools the 8x8 image tokens to 4x4 before the projector.
"""

import ml_collections

from configs._train_common import base


def get_config():
    c = base()
    c.config_name = "vlm_connector"
    c.task = "vqa"
    c.model.kind = "vlm"
    c.model.vlm = ml_collections.ConfigDict()
    c.model.vlm.tiling = None            # AnyRes (rows, cols), e.g. (2, 2) with data.image_size = 2 x the tower's
    c.model.vlm.vision = ml_collections.ConfigDict(dict(image_size=64, patch_size=8, dim=96, num_layers=3,
                                                        num_heads=3, mlp_dim=192, feature_layer=-1))
    c.model.vlm.text = ml_collections.ConfigDict(dict(vocab_size=96, dim=96, num_layers=2, num_heads=3,
                                                      num_kv_heads=3, mlp_dim=192))
    c.model.plan = ml_collections.ConfigDict(dict(point="none", method="none"))
    c.model.reduction = ml_collections.ConfigDict(dict(method="none"))
    c.data.name = "synth_vqa"
    c.data.image_size = 64
    c.data.size = 20000
    c.data.eval_size = 1000
    c.data.seed = 0
    c.data.grid = 4
    c.data.min_objects = 3
    c.data.max_objects = 10
    c.data.style = "auto"
    c.data.eval_split = "val"
    c.data.mean = (0.5,)
    c.data.std = (0.5,)
    c.data.augment.flip = False    # left/right questions: never flip
    c.train.steps = 2000
    c.train.batch_size = 64
    c.train.eval_batch_size = 250
    c.train.eval_every = 500
    c.train.log_every = 25
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.trainable = ()         # e.g. ("^multi_modal_projector/",) with a pretrained tower and LM
    c.checkpoint.every = 500
    return c
