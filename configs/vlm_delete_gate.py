"""A learned delete gate (MrT5-style, :mod:`reduction.delete_gate`) in the real VLM's LLM, trained with train.py.

The VLM of ``configs/vlm_smol.py`` (DINOv2-small -> projector -> SmolLM2-135M-Instruct, 65 image tokens) with the
shipped projector (``pretrained/vlm_smol/projector.npz``) loaded and frozen; only the gate before LLM layer 2 trains
(``optim.trainable=("^learned/",)``). In training the gate is a soft key bias on the image tokens in layers 2-29 plus
the deletion-ratio loss toward ``target``; the evaluation runs the inference mode (hard deletion of the tokens whose
gate is below the threshold, up to the capacity ``keep_ratio`` of the image tokens).

    python train.py --config configs/vlm_delete_gate.py --workdir runs/delete_gate
    python train.py --config configs/vlm_delete_gate.py --workdir runs/delete_gate model.plan.side=text
    # the same deletion at random, for comparison (one step at lr 1e-12: an evaluation of the shipped projector)
    python train.py --config configs/vlm_delete_gate.py --workdir runs/random_del train.steps=1 optim.lr=1e-12 \
        optim.warmup_steps=0 "optim.trainable=('^multi_modal_projector/',)" model.plan.method=random \
        model.plan.keep=21 "model.plan.layers=[2]"

Every setting here is a **GUESS** sized for a 2-core CPU (a few dozen steps at batch 4).
"""

from configs.vlm_smol import get_config as vlm_smol


def get_config():
    c = vlm_smol()
    c.config_name = "vlm_delete_gate"
    c.model.vlm.projector = "pretrained/vlm_smol/projector.npz"   # the shipped projector, frozen below
    c.model.plan = dict(point="llm", method="delete_gate", layers=[2], side="image", target=0.5, weight=10.0,
                        keep_ratio=0.75, scale=-30.0, threshold=-15.0, init_bias=2.0, protect_last=1)
    c.optim.trainable = ("^learned/",)
    c.optim.lr = 0.02
    c.optim.warmup_steps = 5
    c.optim.clip_norm = 0.0
    c.train.steps = 40
    c.train.batch_size = 4
    c.train.eval_batch_size = 25
    c.train.eval_every = 0
    c.train.log_every = 5
    c.data.eval_size = 100
    c.checkpoint.every = 20
    c.checkpoint.keep = 1
    return c
