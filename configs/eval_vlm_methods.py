"""Every method that fits each insertion point of the real VLM at 1/9 of the image tokens (the methods table).

The model, data and projector of ``eval_vlm_smol`` (DINOv2-small 112 px -> trained projector -> SmolLM2-135M,
65 image tokens incl. the class token, 100 generated VQA validation scenes); one budget: ``keep = round(65 / 9) = 7``
image tokens (pooling: a 3 x 3 window). Staged LLM methods act at their own layers (``options.<method>.layers``)
and reach the budget after their last stage, so their FLOPs sit above the single-stage methods'; the table reports
the FLOPs of every row.

``delete_gate`` is the MrT5-style learned gate trained by ``configs/vlm_delete_gate.py`` (shipped in
``pretrained/vlm_delete_gate``, ``learned.delete_gate``): before LLM layer 2 it keeps the image tokens whose gate
passes its threshold, at most ``keep`` of them (highest gates first), so its kept count is data-dependent:
``llm_tokens_after`` / ``total_flops`` are at the capacity, ``real_llm_tokens_after`` / ``real_total_flops`` at the
tokens really kept (mean over the examples).

    python eval.py --config eval_vlm_methods              # writes results/eval/eval_vlm_methods/
"""

import ml_collections

from configs.eval_vlm_smol import get_config as _default


def get_config() -> ml_collections.ConfigDict:
    c = _default()
    c.config_name = "eval_vlm_methods"
    c.fractions = (1 / 9,)
    c.methods = ml_collections.ConfigDict(dict(
        vision=("random", "tome", "visionzip", "vispruner", "divprune", "todre", "kmeans", "tokencorr", "cdpruner", "hot"),
        connector=("random", "pool", "divprune", "todre", "kmeans", "cdpruner", "script", "hot"),
        llm=("random", "dart", "fastv", "divprune", "cdpruner", "script", "pyramiddrop", "sparsevlm", "todre_llm",
             "delete_gate"),
    ))
    # staged LLM methods at their papers' relative layers of SmolLM2's 30 (see docs/pruning.md); the budget
    # (keep) is what is left after the last stage
    c.options.pyramiddrop = ml_collections.ConfigDict(dict(layers=[8, 15, 22]))
    c.options.sparsevlm = ml_collections.ConfigDict(dict(layers=[3, 7, 15]))
    c.options.todre_llm = ml_collections.ConfigDict(dict(layers=[19]))
    c.learned.delete_gate = "pretrained/vlm_delete_gate"      # or a train.py run dir, e.g. runs/delete_gate
    return c
