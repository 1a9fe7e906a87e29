"""Tiny VLM smoke sweep (tests): the random small VLM of ``configs/vlm_connector.py``, a few examples, one budget
per method and point."""

from configs.eval_vlm_smol import get_config as _default


def get_config():
    c = _default()
    c.config_name = "eval_vlm_quick"
    c.train_config = "vlm_connector"
    c.train_overrides = ("data.size=64", "data.eval_size=16", "model.vlm.text.num_layers=3")
    c.projector = ""
    c.num_test = 16
    c.batch_size = 8
    c.fractions = (2 / 9,)
    c.llm_layer = 1
    c.methods.vision = ("random", "tome")
    c.methods.connector = ("pool", "divprune")
    c.methods.llm = ("dart", "fastv")
    c.repeats = 1
    c.decode_steps = 2
    return c
