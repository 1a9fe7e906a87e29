"""VLM sweep on the sparse task: DINOv2-small -> projector -> SmolLM2-135M on ``configs/vlm_smol_sparse.py``.

One to three 12 px objects on a 112 px canvas (colour of a shape, shape of a colour, how many objects), so most of
the 65 image tokens are background and the kept ones decide the answer. Methods x budgets (keep 1/3, 2/9 and 1/9
of the image tokens) at the three insertion points, with random pruning at the connector and inside the LLM as the
paired references (``table.md`` ends with the paired table and the accuracy per question family).

    python eval.py --config eval_vlm_sparse                                  # the shipped projector
    python eval.py --config eval_vlm_sparse projector=runs/vlm_smol_sparse   # your own run's projector
"""

import ml_collections

from configs.eval_vlm_smol import get_config as _default


def get_config() -> ml_collections.ConfigDict:
    c = _default()
    c.config_name = "eval_vlm_sparse"
    c.train_config = "vlm_smol_sparse"
    c.projector = "pretrained/vlm_smol_sparse/projector.npz"
    c.num_test = 150
    c.batch_size = 25
    c.methods = ml_collections.ConfigDict(dict(
        vision=("tome", "pitome", "visionzip"),
        connector=("random", "pool", "divprune"),
        llm=("random", "dart", "fastv", "atp"),      # atp: a fixed threshold, capacity = the budget
    ))
    return c
