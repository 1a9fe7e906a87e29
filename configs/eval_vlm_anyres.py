"""AnyRes + GlobalCom2 on the real VLM (DINOv2-small -> trained projector -> SmolLM2-135M, ``configs/vlm_smol.py``).

224 px generated scenes with 8 x 8 cells (3-9 objects of 21 px; single-digit counts), so a crop (112 px, 4 x 4
cells) looks like a training scene while the 112 px thumbnail halves every object. Settings: the thumbnail alone
(65 tokens), AnyRes 2 x 2 unreduced (5 x 65 = 325 tokens: thumbnail first, then the crops row-major, each with its
class token), and at the VLM sweep's budgets (keep 1/3, 2/9, 1/9 of the 325 tokens: 108, 72, 36) AnyRes + GlobalCom2
at the connector (``keep`` sets its base ratio), a uniform per-crop allocation (GlobalCom2's ranking) and a per-crop
random pruning. The projector was trained on 112 px thumbnails only (one tile, one class token in front): the tiled
layout is new to it (``model.vlm.tiling=(2,2)`` trains one on tiles, see docs/vlm.md).

    python eval.py --config eval_vlm_anyres                 # evaluation.vlm_anyres; ~40 min on 2 loaded CPU cores
    python eval.py --config eval_vlm_anyres num_test=200 "fractions=(0.1111111111111111,)"
    python eval.py --config eval_vlm_anyres projector=runs/vlm_anyres    # a projector trained on tiles
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.config_name = "eval_vlm_anyres"
    c.kind = "vlm_anyres"
    c.train_config = "vlm_smol"
    c.train_overrides = ("data.image_size=224", "data.grid=8", "data.min_objects=3", "data.max_objects=9")
    c.projector = "pretrained/vlm_smol/projector.npz"
    c.num_test = 50
    c.batch_size = 10
    c.tiling = (2, 2)
    c.baselines = True                   # the thumbnail alone and AnyRes unreduced first
    c.fractions = (1 / 3, 2 / 9, 1 / 9)  # keep = round(fraction x 325) tokens of the AnyRes span
    c.variants = ("globalcom2", "uniform", "random")   # evaluation.vlm_anyres.VARIANTS
    c.settings = ()                      # extra (label, tiled, spec) rows, e.g. ("gc2@0.25", True, {...keep_ratio...})
    c.out_dir = ""
    return c
