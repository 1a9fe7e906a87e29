"""Every registered method trains from the command line (``train.py --config vit_fmnist`` with the method's spec
as field overrides, a few steps each), and DivPrune trains inside the VLM at the tower, the connector and the LLM."""

from __future__ import annotations

import json

import numpy as np
import pytest

import reduction as R
import train

TINY = [
    "data.name=synthetic", "data.image_size=16", "data.eval_limit=32", "data.num_threads=1",
    "model.vit.width=32", "model.vit.depth=2", "model.vit.mlp_dim=64", "model.vit.heads=2",
    "model.vit.patch_size=4", "model.vit.image_size=16", "model.vit.num_classes=4",
    "train.batch_size=8", "train.eval_batch_size=16", "train.log_every=1", "train.progress=False",
    "train.eval_at_end=False", "train.steps=2", "optim.warmup_steps=1", "checkpoint.every=2",
    "checkpoint.use_async=False", "train.tensorboard=False",
]

# The amount of each method that a 2-block model with 16 patches can take; every other option at its default.
AMOUNT = {"tome": ["model.reduction.r=2"], "pool": ["model.reduction.k=2"]}


def _vit_methods():
    """Every ViT method; beyond ToMe and DivPrune they run in the long suite (``pytest -m long``)."""
    return [m if m in ("tome", "divprune") else pytest.param(m, marks=pytest.mark.long)
            for m in R.available_methods("vit") if m != "none" and not m.startswith("_")]   # _: test-only methods


@pytest.mark.parametrize("method", _vit_methods())
def test_every_method_trains_from_the_command_line(tmp_path, method):
    overrides = TINY + [f"model.reduction.method={method}"] + AMOUNT.get(method, [])
    summary = train.main(["--config", "vit_fmnist", "--workdir", str(tmp_path), *overrides])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    assert summary["step"] == 2 and (tmp_path / "checkpoints" / "2").is_dir()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["reduction"]["method"] == method
    assert "r" not in saved["model"]["reduction"] or method == "tome"   # the preset's ToMe options were dropped


VLM = [
    "train.steps=2", "train.batch_size=8", "train.eval_batch_size=16", "train.progress=False",
    "train.eval_at_end=False", "train.tensorboard=False", "data.size=64", "data.style=shapes",
    "optim.warmup_steps=0", "train.log_every=1", "data.eval_size=32", "model.vlm.vision.num_layers=2", "model.vlm.text.num_layers=3",
    "checkpoint.use_async=False",
]


@pytest.mark.parametrize("point", [pytest.param("vision", marks=pytest.mark.long),
                                   pytest.param("connector", marks=pytest.mark.long),
                                   pytest.param("llm", marks=pytest.mark.long)])
def test_divprune_trains_in_the_vlm_at_every_point(tmp_path, point):
    overrides = VLM + [f"model.plan.point={point}", "model.plan.method=divprune", "model.plan.keep_ratio=0.5"]
    train.main(["--config", "vlm_connector", "--workdir", str(tmp_path), *overrides])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["plan"] == {"point": point, "method": "divprune", "keep_ratio": 0.5}
