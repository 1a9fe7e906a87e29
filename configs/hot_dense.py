"""HoT on a dense task: prune in the middle of a small ViT, recover one token per patch at the end, label every patch.

Data: ``synth_seg`` (the SynthVQA scenes, 48 px, a 3x3 board of 2-7 coloured shapes; each 6x6 patch is labelled
with the colour of the shape covering most of it, or background: 9 classes). Model: width 64, depth 4, patch 6
(64 patches + class token), a linear head on every token (``pool="dense"``), task ``dense`` (per-patch
cross-entropy; eval accuracy = patch accuracy, ``eval_inter_<c> / eval_union_<c>`` the per-class IoU).

Reduction: HoT's token pruning cluster (``"hot"``, DPC-kNN centres) after the attention of block 1 keeps 21 of the
64 patches (``keep_ratio = 1/3``, the official 81/243), so blocks 2-3 run on 22 tokens. Recovery
(``model.recover``): ``"hot"`` attaches the learned cross-attention :class:`reduction.nnx.HoTRecovery` after the
attention of the last block (64 learned queries + sine-cosine positions over the 22 remaining tokens); ``"unmerge"``
keeps the 22 tokens and each patch copies the output of its DPC-kNN centre (``reduction.unmerge`` on the source
map). Everything trains from scratch, 400 steps at batch 32 (a few minutes on the 2-core CPU box).

    python train.py --config hot_dense                                   # HoT recovery
    python train.py --config hot_dense model.recover.method=unmerge      # training-free recovery, same pruning
    python train.py --config hot_dense model.reduction.method=none model.recover.method=unmerge   # no pruning
    python -m bench.hot_dense                                            # all three + the table in docs/pruning.md
"""

import ml_collections

from configs._train_common import base, vit_block


def get_config():
    c = base()
    c.config_name = "hot_dense"
    c.task = "dense"
    c.model.vit = vit_block(width=64, depth=4, mlp_dim=128, heads=4, patch_size=6, image_size=48, num_classes=9,
                            pool="dense")
    c.model.reduction = ml_collections.ConfigDict(dict(method="hot", keep_ratio=1.0 / 3.0, layers=(1,)))
    c.model.recover = ml_collections.ConfigDict(dict(
        method="hot",      # "hot" (learned cross-attention recovery) | "unmerge" (copy the representative)
        layer=-1,          # block whose after-attention point recovers (negative: from the end)
        heads=4,           # recovery heads
        pos="sincos",      # "sincos" (fixed 2-D codes on queries and kept tokens; GUESS) | "none" (official TRA)
        norm=False,        # LayerNorm on the tokens before keys/values (GUESS; the official TRA has none)
    ))
    c.data.name = "synth_seg"
    c.data.image_size = 48
    c.data.patch = 6
    c.data.grid = 3
    c.data.classes = "colour"
    c.data.size = 2000
    c.data.eval_size = 500
    c.data.eval_split = "test"
    c.data.mean = (0.5,)
    c.data.std = (0.5,)
    c.train.steps = 400
    c.train.batch_size = 32
    c.train.eval_batch_size = 250
    c.train.eval_every = 0
    c.train.log_every = 100
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 40
    c.checkpoint.every = 0
    return c
