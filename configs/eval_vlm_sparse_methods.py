"""Every training-free method of each insertion point at 1/9 of the image tokens, on the sparse task.

The model, data and projector of ``eval_vlm_sparse`` (one to three small objects: the kept tokens decide the
answer); the method list and the staged methods' layers of ``eval_vlm_methods``, without the learned
``delete_gate`` (its shipped gate was trained with the other task's projector).

    python eval.py --config eval_vlm_sparse_methods        # writes results/eval/eval_vlm_sparse_methods/
"""

import ml_collections

from configs.eval_vlm_methods import get_config as _methods
from configs.eval_vlm_sparse import get_config as _sparse


def get_config() -> ml_collections.ConfigDict:
    c = _methods()
    s = _sparse()
    c.config_name = "eval_vlm_sparse_methods"
    c.train_config, c.projector, c.num_test = s.train_config, s.projector, s.num_test
    c.methods.llm = tuple(m for m in c.methods.llm if m != "delete_gate")
    c.learned.delete_gate = ""
    return c
