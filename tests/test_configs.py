"""Training presets load, overrides are typed and checked, the CLI parses, resolved configs round-trip."""

from __future__ import annotations

import json

import ml_collections
import pytest

import configs
import train

PRESETS = ["vit_fmnist", "vit_animal_mnist", "deit_s_imagenet", "tome_finetune", "vlm_connector", "atp_threshold"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_with_all_training_blocks(name):
    cfg = configs.load_config(name)
    assert cfg.config_name == name
    for block in ("model", "data", "train", "optim", "checkpoint", "mesh"):
        assert isinstance(cfg[block], ml_collections.ConfigDict), block
    assert cfg.train.batch_size > 0 and cfg.train.steps > 0 and cfg.optim.lr > 0


def test_override_typo_names_the_field():
    with pytest.raises(configs.ConfigError, match="optim.lrr"):
        configs.load_config("vit_fmnist", ["optim.lrr=0.1"])
    with pytest.raises(configs.ConfigError, match="unknown option 'rr' for method 'tome' .did you mean 'r'.*inflect"):
        configs.load_config("vit_fmnist", ["model.reduction.rr=4"])
    with pytest.raises(configs.ConfigError):
        configs.load_config("vit_fmnist", ["train.steps=lots"])  # int field, string value


def test_overrides_parse_types():
    cfg = configs.load_config("vit_fmnist", ["train.steps=100", "model.reduction.r=4", "optim.lr=1",
                                             "mesh.fsdp=true", "optim.frozen=['^head']", "data.name=animal_mnist"])
    assert cfg.train.steps == 100 and cfg.model.reduction.r == 4
    assert isinstance(cfg.optim.lr, float) and cfg.mesh.fsdp is True
    assert cfg.optim.frozen == ("^head",) and cfg.data.name == "animal_mnist"


def test_reduction_spec_from_config():
    assert train.reduction_spec(configs.load_config("vit_fmnist")) == {"method": "tome", "r": 0, "prop_attn": True}
    spec = train.reduction_spec(configs.load_config("vit_fmnist", ["model.reduction.r=4"]))
    assert spec["r"] == 4
    assert train.reduction_spec(configs.load_config("vit_fmnist", ["model.reduction.method=none"])) is None


def test_cli_parsing_and_saved_config(tmp_path):
    args = train.parse_args(["--config", "vit_fmnist", "--workdir", str(tmp_path), "train.steps=7",
                             "model.reduction.r=4"])
    cfg = configs.load_config(args.config, args.overrides)
    path = configs.save_config(cfg, tmp_path)
    saved = json.loads(path.read_text())
    assert saved["train"]["steps"] == 7 and saved["model"]["reduction"]["r"] == 4
    assert saved["config_name"] == "vit_fmnist"


def test_distributed_mode_is_validated():
    with pytest.raises(ValueError, match="mesh.distributed"):
        train.maybe_initialize_distributed("maybe")
    train.maybe_initialize_distributed("off")  # no-op


def test_spec_fields_are_overridable_one_by_one():
    """Each spec field is its own override; changing the method starts from that method's defaults, whatever
    the order; the whole spec is one override too; the VLM plan works the same way."""
    def spec(*overrides, name="vit_fmnist"):
        cfg = configs.load_config(name, list(overrides))
        return train.reduction_spec(cfg) if name != "vlm_connector" else train.reduction_spec_vlm(cfg)

    assert spec("model.reduction.method=pitome") == {"method": "pitome"}
    assert spec("model.reduction.keep_ratio=0.5", "model.reduction.method=dart") == {"method": "dart", "keep_ratio": 0.5}
    assert spec("model.reduction.r=[2, 1]") == {"method": "tome", "r": [2, 1], "prop_attn": True}
    assert spec("model.reduction={'method': 'zerotprune', 'iterations': 3}") == {"method": "zerotprune", "iterations": 3}
    assert spec("model.plan.point=llm", "model.plan.method=dart", "model.plan.keep=16", name="vlm_connector") == {
        "point": "llm", "method": "dart", "keep": 16}
    with pytest.raises(configs.ConfigError, match="unknown option 'keep_ratio' for method 'tome'"):
        spec("model.reduction.keep_ratio=0.5")
    with pytest.raises(configs.ConfigError, match="did you mean 'pitome'"):
        spec("model.reduction.method=pitom")
    with pytest.raises(configs.ConfigError, match="cannot run at the 'llm' point.*divprune"):
        spec("model.plan.point=llm", "model.plan.method=tome", name="vlm_connector")
    with pytest.raises(configs.ConfigError, match="must be a dict spec"):
        spec("model.reduction=tome")


def test_eval_presets_check_fixed_options_at_the_methods_own_points():
    for name in configs.available_configs():
        if name.startswith("eval"):
            configs.load_config(name)              # options.<llm-only method> is checked at the llm point
    with pytest.raises(configs.ConfigError, match=r"options\.pyramiddrop: unknown option 'typo'"):
        configs.load_config("eval_vlm_methods", ["options.pyramiddrop.typo=3"])
