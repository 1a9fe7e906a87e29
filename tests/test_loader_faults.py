"""Issue 15 item 10: damaged or incomplete checkpoints never load as a different model with ``report.ok``.

A timm state dict missing its last block (or a middle one), its ``cls_token`` or ``blocks.0.mlp.fc1.weight``; an HF
directory missing tensors; empty / truncated ``.npz`` and ``.safetensors`` files; a head count the tensors do not
state. Each is a :class:`loaders.LoadError` naming the key or the path. Shapes are tiny; most checks stop in
``config_from_timm`` before a model is built."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from loaders import LoadError, load_big_vision, load_hf_vit, load_timm, load_timm_state_dict
from loaders.timm import config_from_timm
from tests.synthetic_weights import timm_dict, without


def test_missing_blocks_are_named_not_loaded_as_a_smaller_model(tmp_path):
    # a 192-wide (timm "tiny") checkpoint whose last block was lost: before, an 11-block model with report.ok
    sd = timm_dict(c=192, depth=12, shapes_only=True)
    with pytest.raises(LoadError, match=r"found 11 blocks .*192-wide ViTs have 12.*pass depth=11"):
        config_from_timm(without(sd, "blocks.11."))
    assert config_from_timm(without(sd, "blocks.11."), depth=11).depth == 11      # said explicitly: accepted
    assert config_from_timm(sd).heads == 3 and config_from_timm(sd).depth == 12
    with pytest.raises(LoadError, match=r"block\(s\) \[4\] have no tensors"):
        config_from_timm(without(sd, "blocks.4."))
    # a non-standard width: the depth a config.json next to the file states is checked
    small = timm_dict(depth=3)
    save_file(without(small, "blocks.2."), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_custom",
                                                      "model_args": {"depth": 3, "num_heads": 2}}))
    with pytest.raises(LoadError, match=r"model\.safetensors: depth 3 .*block\(s\) \[2\] missing"):
        load_timm(tmp_path / "model.safetensors")
    from loaders.timm import stated_architecture

    assert stated_architecture(json.loads((tmp_path / "config.json").read_text())) == {"depth": 3, "heads": 2}


def test_missing_cls_token_and_fc1_are_named():
    sd = timm_dict()
    with pytest.raises(LoadError, match=r"'cls_token' is missing .*position embedding with 5 = grid \+ 1"):
        load_timm_state_dict(without(sd, "cls_token"), heads=2)
    with pytest.raises(LoadError, match=r"'cls_token' is missing .*dist_token"):
        load_timm_state_dict(dict(without(sd, "cls_token"), dist_token=sd["cls_token"]), heads=2)
    with pytest.raises(LoadError, match=r"'blocks\.0\.mlp\.fc1\.weight' is missing"):     # before: bare KeyError
        load_timm_state_dict(without(sd, "blocks.0.mlp.fc1.weight"), heads=2)
    two = timm_dict(depth=2)
    with pytest.raises(LoadError, match=r"missing: blocks\.1\.mlp\.fc1\.kernel"):
        load_timm_state_dict(without(two, "blocks.1.mlp.fc1.weight"), heads=2)


def test_head_count_is_stated_or_required(tmp_path):
    sd = timm_dict(c=96)                                  # a 96-wide, 3-head DeiT: width // 64 would say 1
    with pytest.raises(LoadError, match=r"does not store the head count.*width 96.*pass heads="):
        config_from_timm(sd)
    assert config_from_timm(sd, heads=3).heads == 3
    assert config_from_timm(sd, config={"model_args": {"num_heads": 3}}).heads == 3
    assert config_from_timm(timm_dict(c=1280, depth=32, mlp=4, shapes_only=True)).heads == 16       # ViT-H: not 1280 // 64 = 20
    assert config_from_timm(timm_dict(c=96), config={"architecture": "deit_tiny_patch16_224"}, depth=1).heads == 3
    with pytest.raises(LoadError, match="does not split into heads=5"):
        config_from_timm(sd, heads=5)


def test_empty_and_truncated_files_name_the_path(tmp_path):
    bv = {"embedding/kernel": np.zeros((4, 4, 3, 8), np.float32), "cls": np.zeros((1, 1, 8), np.float32)}
    np.savez(tmp_path / "good.npz", **bv)
    raw = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "none.npz")
    for name, why in (("cut.npz", "truncated or damaged"), ("empty.npz", "empty"), ("none.npz", "no arrays"),
                      ("absent.npz", "no .npz file")):
        with pytest.raises(LoadError, match=rf"{name}.*{why}|{why}.*{name}"):
            load_big_vision(tmp_path / name)
    save_file(timm_dict(), str(tmp_path / "m.safetensors"))
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 100])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name, why in (("cut.safetensors", "truncated or damaged"), ("empty.safetensors", "empty")):
        with pytest.raises(LoadError, match=rf"{name}.*{why}"):
            load_timm(tmp_path / name, heads=2)


def hf_vit_dir(path, *, c=16, depth=1, mlp=8, patch=4, image=8, seed=0):
    rng = np.random.default_rng(seed)
    n = (image // patch) ** 2 + 1
    t = {"embeddings.cls_token": rng.normal(size=(1, 1, c)), "embeddings.position_embeddings": rng.normal(size=(1, n, c)),
         "embeddings.patch_embeddings.projection.weight": rng.normal(size=(c, 3, patch, patch)),
         "embeddings.patch_embeddings.projection.bias": np.zeros(c), "layernorm.weight": np.ones(c),
         "layernorm.bias": np.zeros(c)}
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for n_ in ("query", "key", "value"):
            t[p + f"attention.attention.{n_}.weight"] = rng.normal(size=(c, c))
            t[p + f"attention.attention.{n_}.bias"] = np.zeros(c)
        t.update({p + "attention.output.dense.weight": rng.normal(size=(c, c)), p + "attention.output.dense.bias": np.zeros(c),
                  p + "layernorm_before.weight": np.ones(c), p + "layernorm_before.bias": np.zeros(c),
                  p + "layernorm_after.weight": np.ones(c), p + "layernorm_after.bias": np.zeros(c),
                  p + "intermediate.dense.weight": rng.normal(size=(mlp, c)), p + "intermediate.dense.bias": np.zeros(mlp),
                  p + "output.dense.weight": rng.normal(size=(c, mlp)), p + "output.dense.bias": np.zeros(c)})
    cfg = {"model_type": "vit", "hidden_size": c, "num_hidden_layers": depth, "num_attention_heads": 2,
           "intermediate_size": mlp, "image_size": image, "patch_size": patch}
    return {k: np.asarray(v, np.float32) for k, v in t.items()}, cfg


def test_hf_missing_tensors_are_named(tmp_path):
    tensors, cfg = hf_vit_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model, report = load_hf_vit(tmp_path)
    assert report.ok and model.config.heads == 2
    for key in ("embeddings.cls_token", "encoder.layer.0.intermediate.dense.weight",
                "encoder.layer.0.attention.attention.key.weight"):
        save_file(without(tensors, key), str(tmp_path / "model.safetensors"))
        with pytest.raises(LoadError, match=rf"lacks 1 tensor\(s\) the model needs: '{key}'"):   # before: KeyError
            load_hf_vit(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LoadError, match=r"model\.safetensors' is empty"):
        load_hf_vit(tmp_path)
