"""Trained learned reducers (e.g. the MrT5-style ``delete_gate``) for the VLM sweep: load, check, export.

A learned method's spec (``{"method": "delete_gate", ...}``) is a weightless declaration; without weights the sweep
would run it at its initialisation. ``learned.<method>`` in a sweep config names where its trained weights are:

* a **shipped folder** (``pretrained/vlm_delete_gate``): ``learned.npz`` (the ``learned/<layer>/...`` parameters,
  written by :func:`export_learned`) and ``config.json`` (the resolved config of the run that trained them);
* a **train.py run** (``runs/delete_gate``): its ``config.json`` and the latest checkpoint under ``checkpoints/``;
* ``"init"``: no weights, the module at its initialisation (a labelled placeholder, never the method).

:func:`prepare_learned` checks the source against the row before anything compiles and raises
:class:`LearnedReducerError` when it is missing, trained for another plan (method, point, layers, side, scale) or
holds parameters of another shape (another LM width). Options that only set the inference capacity (``keep``,
``keep_ratio``) and ``threshold`` may differ from training; every option the row leaves out comes from the trained
run's ``model.plan``.

Shapes: the loaded module is the one training attached (``VLM.attach_learned``), so ``learned/2/gate/kernel`` is
``[C, 1]`` and ``learned/2/gate/bias`` ``[1]`` for a gate before LLM layer 2 of an LM of width ``C``.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np

LEARNED_NPZ = "learned.npz"
INIT = "init"
# the inference capacity: a row that sets either takes neither from the trained run (``keep`` wins over
# ``keep_ratio``, so an inherited one would silently override the row's)
CAPACITY = ("keep", "keep_ratio")
# options that must agree between the row and the run that trained the weights
STRUCTURAL = ("method", "point", "layers", "side", "scale")


class LearnedReducerError(ValueError):
    """A learned reducer's weights are missing, or were trained for another plan or model."""


def is_learned(plan) -> bool:
    """Whether ``plan`` (a :class:`models.vlm.ReductionPlan`) declares a learned LLM reducer."""
    return any(r is not None and getattr(r, "learned", False) for r in (plan.llm or ()))


def read_source(source: str) -> tuple[dict, dict, str]:
    """``source`` (a folder with ``learned.npz`` + ``config.json``, or a train.py run dir) ->
    ``(trained model.plan spec, {"learned/...": array}, description)``."""
    from training.run_params import latest_run_params

    p = pathlib.Path(source)
    if not p.is_dir():
        raise LearnedReducerError(f"learned reducer source {source!r} is not a folder (expected a folder with "
                                  f"{LEARNED_NPZ} + config.json, or a train.py run dir)")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise LearnedReducerError(f"learned reducer source {source!r} has no config.json (the trained run's config)")
    trained = json.loads(cfg_path.read_text())
    plan = dict((trained.get("model") or {}).get("plan") or {})
    if (p / LEARNED_NPZ).is_file():
        with np.load(p / LEARNED_NPZ) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
        desc = str(p / LEARNED_NPZ)
    elif (p / "checkpoints").is_dir():
        ckpt, step, src = latest_run_params(p)
        if step is None:
            raise LearnedReducerError(f"learned reducer source {source!r}: no checkpoint in {ckpt}")
        arrays = {k: np.asarray(v) for k, v in src.items()}
        desc = f"{ckpt} step {step}"
    else:
        raise LearnedReducerError(f"learned reducer source {source!r} holds neither {LEARNED_NPZ} nor a train.py "
                                  f"checkpoint")
    arrays = {k: v for k, v in arrays.items() if k.startswith("learned/")}
    if not arrays:
        raise LearnedReducerError(f"learned reducer source {source!r} holds no learned/ parameters")
    return plan, arrays, desc


def merged_spec(row: dict, trained: dict, source: str) -> dict:
    """The row's spec with the trained run's options filled in; :class:`LearnedReducerError` when a structural
    option (:data:`STRUCTURAL`) differs."""
    out = dict(row)
    skip = CAPACITY if any(k in row for k in CAPACITY) else ()
    for key in STRUCTURAL:
        if key in row and key in trained and _norm(row[key]) != _norm(trained[key]):
            raise LearnedReducerError(f"learned reducer {source!r} was trained with {key}={trained[key]!r}, the sweep "
                                      f"row asks for {key}={row[key]!r}")
    for key, value in trained.items():
        if key not in out and key not in skip:
            out[key] = value
    return out


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def prepare_learned(model, spec: dict, source: str):
    """A VLM that shares ``model``'s tower, projector and LM, with the learned reducers of ``spec`` attached and
    loaded from ``source`` (or at their initialisation for ``"init"``).

    Returns ``(vlm, plan, spec, description)``; ``model`` itself is left unchanged (attached learned modules always
    run at their layers, so they must not stay on the sweep's shared model)."""
    from flax import nnx

    from models.vlm import VLM
    from training.run_params import copy_matching_params

    if not source:
        raise LearnedReducerError(f"method {spec.get('method')!r} is learned: set learned.{spec.get('method')}= a "
                                  f"trained source (e.g. pretrained/vlm_delete_gate or a train.py run dir) or "
                                  f"'{INIT}' for its initialisation")
    arrays, desc = {}, "initialisation (untrained)"
    if source != INIT:
        trained, arrays, desc = read_source(source)
        spec = merged_spec(spec, trained, source)
    vlm = VLM(model.cfg, vision_tower=model.vision_tower, language_model=model.language_model,
              projector=model.multi_modal_projector)
    plan = vlm.build_plan(spec)
    vlm.attach_learned(plan, rngs=nnx.Rngs(0))
    if source == INIT:
        return vlm, plan, spec, desc
    want = {"/".join(str(k) for k in path): tuple(var[...].shape)
            for path, var in nnx.to_flat_state(nnx.state(vlm, nnx.Param))}
    want = {k: s for k, s in want.items() if k.startswith("learned/")}
    missing = sorted(set(want) - set(arrays))
    extra = sorted(set(arrays) - set(want))
    shape = sorted(k for k in set(want) & set(arrays) if tuple(arrays[k].shape) != want[k])
    if missing or extra or shape:
        raise LearnedReducerError(
            f"learned reducer {source!r} does not match the row's plan on this model: missing {missing}, unexpected "
            f"{extra}, other shape {[(k, tuple(arrays[k].shape), want[k]) for k in shape]}")
    left = [k for k in copy_matching_params(vlm, arrays) if k.startswith("learned/")]
    assert not left, left
    return vlm, plan, spec, desc


def export_learned(run_dir: str, out: str) -> pathlib.Path:
    """Write a train.py run's learned reducers to the folder ``out``: ``learned.npz`` (the latest checkpoint's
    ``learned/`` parameters), the run's ``config.json``, and its ``metrics.jsonl`` / ``summary.json`` when present."""
    from training.run_params import latest_run_params

    ckpt, step, src = latest_run_params(run_dir)
    if step is None:
        raise LearnedReducerError(f"no checkpoint in {ckpt}")
    arrays = {k: np.asarray(v) for k, v in src.items() if k.startswith("learned/")}
    if not arrays:
        raise LearnedReducerError(f"{ckpt} step {step} holds no learned/ parameters")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / LEARNED_NPZ, **arrays)
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        if (pathlib.Path(run_dir) / name).is_file():
            shutil.copy(pathlib.Path(run_dir) / name, out / name)
    return out


__all__ = ["LearnedReducerError", "is_learned", "read_source", "merged_spec", "prepare_learned", "export_learned",
           "INIT", "LEARNED_NPZ"]
