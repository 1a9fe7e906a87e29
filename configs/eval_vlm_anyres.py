"""AnyRes + GlobalCom2 on the real VLM (DINOv2-small -> trained projector -> SmolLM2-135M, ``configs/vlm_smol.py``).

224 px generated scenes with 8 x 8 cells (3-9 objects of 21 px; single-digit counts), so a crop (112 px, 4 x 4
cells) looks like a training scene while the 112 px thumbnail halves every object. Settings: the thumbnail alone
(65 tokens), AnyRes 2 x 2 unreduced (5 x 65 = 325 tokens: thumbnail first, then the crops row-major, each with its
class token), AnyRes + GlobalCom2 at a base ratio of 1/9 and 2/9 at the connector, and at the same budget a uniform
per-crop allocation (GlobalCom2's ranking) and a per-crop random pruning. The projector was trained on 112 px
thumbnails only (one tile, one class token in front): the tiled layout is new to it.

    python eval.py --config eval_vlm_anyres                 # evaluation.vlm_anyres; ~15 min on 2 loaded CPU cores
    python eval.py --config eval_vlm_anyres num_test=200
"""

import ml_collections


def _gc2(ratio, **kw):
    return {"point": "connector", "method": "globalcom2", "keep_ratio": ratio, "grid": [2, 2], **kw}


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
    c.settings = (
        ("thumbnail", False, None),
        ("anyres", True, None),
        ("anyres+globalcom2@1/9", True, _gc2(1 / 9)),
        ("anyres+uniform@1/9", True, _gc2(1 / 9, allocation="uniform")),
        ("anyres+random@1/9", True, _gc2(1 / 9, allocation="uniform", selection="random")),
        ("anyres+globalcom2@2/9", True, _gc2(2 / 9)),
        ("anyres+uniform@2/9", True, _gc2(2 / 9, allocation="uniform")),
        ("anyres+random@2/9", True, _gc2(2 / 9, allocation="uniform", selection="random")),
    )
    c.out_dir = ""
    return c
