"""VLM trade-off sweep: reduction methods x image-token budgets x insertion points on one VLM.

For every setting (``point`` in tower / connector / LLM, a method, a budget = fraction of the image tokens kept)
the sweep measures on the same evaluation examples:

* ``accuracy``: the arg-max over the answers' first tokens at the last prompt position (the training task's
  scoring, :class:`training.tasks.ChatVQATask` or :class:`training.tasks.VQATask`);
* analytic FLOPs per example (:meth:`models.vlm.VLM.flops`): tower, connector, prefill, one decoded token, and
  ``xla_flops`` (XLA's ``cost_analysis`` of the lowered scoring forward at batch 1, which also counts the
  elementwise work) for the check;
* ``prefill_ms``: the median time of the compiled scoring forward for one batch (tower + connector + prefill):
  ``repeats`` extra calls on the first batch, or with ``repeats=0`` the evaluation batches after the first;
* ``decode_ms_per_token``: the median time of one decode step over the reduced KV cache (batch of the sweep);
* ``kv_cache_bytes``: the K and V caches per example after prefill.

Capacity-padded methods (a static slot count plus a validity mask: ATP, tokencorr, the learned ``delete_gate``,
GlobalCom2) compute every slot, so ``total_flops`` counts them at their capacity. The sweep also measures, per
example and LLM layer, the slots that hold no token (``aux["layer_valid"]`` of the forward, prompt padding left
out) and reports the prefill at the real counts: ``real_llm_tokens_after`` (mean tokens of the last layer) and
``real_total_flops`` (tower + connector as computed, prefill as if the empty slots were not there, averaged over the
examples). For a method without empty slots both equal the static figures.

Learned methods (a declaration with ``learned = True``, e.g. ``delete_gate``) need trained weights:
``learned.<method>`` names a folder (``pretrained/vlm_delete_gate``), a train.py run dir or ``"init"``
(:mod:`evaluation.learned`); the sweep checks and loads them before anything compiles.

The budgets follow LLaVA papers: keep 1/3, 2/9 and 1/9 of the image tokens (576 -> 192 / 128 / 64 at LLaVA size).
The count given to a method is ``round(fraction x image tokens)``; the table reports the image tokens that really
enter the LLM (and, for the LLM point, the tokens its later layers keep).

Entry point: :func:`run` (``eval.py --config eval_vlm_smol``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import statistics
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger("tokenreduce.eval")

POINT_NAMES = {"vision": "tower", "connector": "connector", "llm": "llm"}


@dataclasses.dataclass(frozen=True)
class Setting:
    point: str                 # "none" | "vision" | "connector" | "llm"
    method: str
    fraction: float            # requested fraction of the image tokens kept (1.0 for none)
    spec: Optional[dict]

    @property
    def label(self) -> str:
        if self.point == "none":
            return "none"
        return f"{POINT_NAMES[self.point]}:{self.method}@{self.fraction:.3f}"


def settings_for(cfg, num_image_tokens: int) -> list[Setting]:
    """The sweep's settings from ``cfg.methods`` (a mapping point -> method names), ``cfg.fractions``,
    ``cfg.llm_layer`` and ``cfg.options`` (``options.<method>.<option>``; ``options.<method>.layers`` replaces
    ``[llm_layer]`` for a method that acts at several LLM layers)."""
    from configs import spec_from_node

    options = {m: spec_from_node(node) for m, node in (cfg.get("options") or {}).items()}
    out = [Setting("none", "none", 1.0, None)]
    for point in ("vision", "connector", "llm"):
        for method in tuple((cfg.methods or {}).get(point, ()) or ()):
            for frac in cfg.fractions:
                keep = max(1, int(round(float(frac) * num_image_tokens)))
                spec = {"point": point, "method": method, **options.get(method, {})}
                if method == "pool":
                    spec["k"] = max(2, int(round((1.0 / float(frac)) ** 0.5)))
                else:
                    spec["keep"] = keep
                if point == "llm" and "layers" not in spec:   # options.<method>.layers wins (staged methods)
                    spec["layers"] = [int(cfg.llm_layer)]
                out.append(Setting(point, method, float(frac), spec))
    return out


def _task_for(task, model, plan):
    return dataclasses.replace(task, plan=plan, image_tokens=model.num_image_tokens(plan))


def _score_fn(task, tcfg, graphdef):
    """``(params, batch) -> (correct [B] bool, empty [B, L] int32)``, jitted; the task (with its plan) is static.
    ``empty[b, l]``: the slots of LLM layer ``l`` that hold no token of example ``b`` (the empty slots of
    capacity-padded reducers; prompt padding is not counted)."""
    from training.tasks import batch_images

    @jax.jit
    def fn(params, batch):
        model = nnx.merge(graphdef, params)
        ids, valid = task.prompt(batch)
        logits, aux = model(ids, batch_images(batch, tcfg), valid=valid, plan=task.plan, last_logits=True)
        answer_logits = logits[:, -1, jnp.asarray(task.answer_ids)].astype(jnp.float32)
        pad = ids.shape[1] - jnp.sum(valid, axis=-1)
        empty = jnp.stack([m.shape[1] - pad - jnp.sum(m, axis=-1) for m in aux["layer_valid"]], axis=1)
        return jnp.argmax(answer_logits, -1) == batch["answer"], empty.astype(jnp.int32)

    return fn


def layer_flops(text_cfg, t) -> int:
    """FLOPs of one decoder layer on ``t`` tokens (an int or an integer array): the count
    :meth:`models.llama.Llama.prefill_flops` uses (:func:`models.llama.decoder_layer_flops`)."""
    from models.llama import decoder_layer_flops

    return decoder_layer_flops(text_cfg, t)


def real_prefill_flops(text_cfg, prefill: int, cache_lengths, empty: np.ndarray) -> np.ndarray:
    """Per example ``[B]``: the static ``prefill`` FLOPs with every layer ``l`` at ``cache_lengths[l] - empty[:, l]``
    tokens instead of ``cache_lengths[l]`` (``empty: [B, L]``; the reducers' own cost and the head unchanged)."""
    static = np.asarray(cache_lengths, np.int64)[None]
    real = static - np.asarray(empty, np.int64)
    return prefill - np.sum(layer_flops(text_cfg, static) - layer_flops(text_cfg, real), axis=1)


def _families(batches) -> Optional[np.ndarray]:
    """The question family name of every valid example (``data.synth_vqa.QTYPES[qtype]``), or None without ``qtype``."""
    if not batches or "qtype" not in batches[0]:
        return None
    from data.synth_vqa import QTYPES

    q = np.concatenate([np.asarray(b["qtype"])[np.asarray(b["mask"])] for b in batches])
    return np.asarray([QTYPES[int(i)] for i in q])


def accuracy_by_family(correct: np.ndarray, families: np.ndarray) -> dict:
    """``{family: accuracy}`` in first-seen order; ``correct`` and ``families`` are [N], one per valid example."""
    return {f: float(correct[families == f].mean()) for f in dict.fromkeys(families.tolist())}


def _xla_flops(fn, params, batch) -> Optional[float]:
    try:
        ca = fn.lower(params, batch).cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca["flops"])
    except Exception as err:  # cost analysis is backend-dependent
        log.warning("no XLA cost analysis: %s", err)
        return None


def _timed(fn, *args, repeats: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _decode_ms(model, task, tcfg, params_batch, repeats: int, steps: int) -> float:
    """Median ms of one decode step after a prefill under ``task.plan`` (cache sized for ``steps`` new tokens)."""
    from models.generate import decode_next, start_decoding
    from training.tasks import batch_images

    ids, valid = task.prompt(params_batch)
    x, starts, token_valid = model.prompt_embeddings(ids, batch_images(params_batch, tcfg), task.plan)
    if token_valid is not None:
        valid = valid & token_valid
    state = start_decoding(model.language_model, x, valid, max_new_tokens=steps + 1, reducers=task.plan.llm,
                           image_starts=starts, image_len=task.image_tokens)
    state = decode_next(state)            # the first call compiles
    jax.block_until_ready(state.tokens)
    times = []
    for _ in range(min(repeats, steps)):
        t0 = time.perf_counter()
        state = decode_next(state)
        jax.block_until_ready(state.tokens)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def resolve_learned(cfg, model, settings) -> list:
    """Per setting ``(model, plan, spec, learned source)``: the sweep's model and each setting's plan, or for a
    learned method a VLM sharing the sweep model's parts with the weights of ``cfg.learned.<method>`` attached
    (:func:`evaluation.learned.prepare_learned`; :class:`~evaluation.learned.LearnedReducerError` when they are
    missing or do not fit). Runs before any compile."""
    from evaluation.learned import is_learned, prepare_learned

    sources = dict((cfg.get("learned") or {}).items()) if cfg.get("learned") is not None else {}
    out = []
    for s in settings:
        plan = model.build_plan(s.spec)
        if not is_learned(plan):
            out.append((model, plan, s.spec, ""))
            continue
        source = str(sources.get(s.method, "") or "")
        m, plan, spec, desc = prepare_learned(model, dict(s.spec), source)
        log.info("%s: learned weights from %s", s.label, desc)
        out.append((m, plan, spec, desc))
    return out


def load_projector(model, path: str) -> str:
    """Load the projector's weights from a ``.npz`` (:func:`export_projector`) or a ``train.py`` run (its latest
    checkpoint). Returns a description of the source."""
    from training.run_params import copy_matching_params, latest_run_params

    p = pathlib.Path(path)
    if p.suffix == ".npz":
        with np.load(p) as z:
            src = {k: z[k] for k in z.files}
        desc = str(p)
    else:
        ckpt, step, src = latest_run_params(p)
        if step is None:
            raise FileNotFoundError(f"projector={path!r}: no checkpoint in {ckpt}")
        desc = f"{ckpt} step {step}"
    src = {k: v for k, v in src.items() if k.startswith("multi_modal_projector/")}
    if not src:
        raise ValueError(f"projector={path!r} holds no multi_modal_projector/ parameters")
    skipped = [k for k in copy_matching_params(model, src) if k.startswith("multi_modal_projector/")]
    if skipped:
        raise ValueError(f"projector={path!r} does not match this model's projector: {skipped}")
    return desc


def export_projector(run_dir: str, out: str) -> pathlib.Path:
    """Write the projector of a run's latest checkpoint to ``out`` (``.npz``, parameter paths as keys)."""
    from training.run_params import latest_run_params

    ckpt, step, src = latest_run_params(run_dir)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt}")
    arrays = {k: np.asarray(v) for k, v in src.items() if k.startswith("multi_modal_projector/")}
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    return out


def run(cfg, out_dir: pathlib.Path, *, progress: bool = True) -> dict:
    """Build the VLM of ``cfg.train_config`` (+ ``cfg.train_overrides``), load ``cfg.projector``, sweep, write
    ``points.json``, ``points.csv``, ``table.md``, ``pareto.png`` and the resolved ``config.json`` to ``out_dir``."""
    from configs import load_config, save_config
    from data import eval_batches, make_source
    from training.builders import build_vlm
    from training.tasks import make_task

    start = time.perf_counter()
    tcfg = load_config(cfg.train_config, list(cfg.train_overrides))
    model = build_vlm(tcfg)
    proj_src = load_projector(model, cfg.projector) if cfg.projector else "random (untrained)"
    if not cfg.projector:
        log.warning("no projector given: the connector is untrained, accuracies are chance level")
    task = make_task(tcfg, model)
    src = make_source(tcfg.data, tcfg.data.eval_split)
    n = min(int(cfg.num_test), len(src))
    batches = [{k: jnp.asarray(v) for k, v in b.items()}
               for b in eval_batches(src, batch_size=int(cfg.batch_size), limit=n, shard_index=0, shard_count=1)]
    base_k = model.num_image_tokens(model.build_plan(None))
    families = _families(batches)
    settings = settings_for(cfg, base_k)
    models = resolve_learned(cfg, model, settings)   # learned weights checked and loaded before any compile
    text_tokens = len(getattr(task, "prefix_ids", ())) + int(task.question_len)
    rows = []
    iterator = list(zip(settings, models))
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="vlm sweep", unit="setting")
    for s, (m, plan, spec, learned_src) in iterator:
        graphdef, params = nnx.split(m)
        t = _task_for(task, m, plan)
        fn = _score_fn(t, tcfg, graphdef)
        t0 = time.perf_counter()
        correct, mask, times, empty = [], [], [], []
        for i, b in enumerate(batches):
            t1 = time.perf_counter()
            c, e = fn(params, b)
            c, e = np.asarray(c), np.asarray(e)
            times.append(time.perf_counter() - t1)
            correct.append(c)
            empty.append(e)
            mask.append(np.asarray(b["mask"]))
        correct, mask, empty = np.concatenate(correct), np.concatenate(mask), np.concatenate(empty)[np.concatenate(mask)]
        acc = float(correct[mask].mean())
        if int(cfg.repeats) > 0 or len(times) < 2:
            prefill_s = _timed(fn, params, batches[0], repeats=max(1, int(cfg.repeats)))
        else:  # the evaluation batches after the first (which compiled) are the timed calls
            prefill_s = statistics.median(times[1:])
        fl = m.flops(plan, text_tokens=text_tokens)
        real_prefill = real_prefill_flops(m.cfg.text, fl["prefill"], fl["cache_lengths"], empty)
        one = {k: v[:1] for k, v in batches[0].items()}
        xla = _xla_flops(fn, params, one) if cfg.xla_check else None
        dec_ms = None
        if int(cfg.decode_steps) > 0 and learned_src:
            log.warning("%s: no decode timing (generation does not run attached learned reducers)", s.label)
        elif int(cfg.decode_steps) > 0:
            dec_ms = _decode_ms(m, t, tcfg, batches[0], int(cfg.repeats), int(cfg.decode_steps))
        rows.append(dict(
            label=s.label, point=s.point, method=s.method, fraction=s.fraction, spec=spec, learned=learned_src,
            accuracy=acc, accuracy_se=float(np.sqrt(acc * (1 - acc) / max(1, int(mask.sum())))),
            correct=correct[mask].astype(int).tolist(),
            accuracy_by_family=None if families is None else accuracy_by_family(correct[mask], families),
            image_tokens=fl["image_tokens"], image_keep=fl["image_tokens"] / base_k,
            real_image_tokens=float(fl["image_tokens"] - empty[:, 0].mean()),
            llm_tokens_after=fl["cache_lengths"][-1],
            real_llm_tokens_after=float(fl["cache_lengths"][-1] - empty[:, -1].mean()),
            tower_flops=fl["tower"], connector_flops=fl["connector"],
            prefill_flops=fl["prefill"], total_flops=fl["total"], decode_flops=fl["decode"],
            real_total_flops=float(fl["tower"] + fl["connector"] + real_prefill.mean()),
            xla_flops=xla, xla_ratio=None if xla is None else xla / fl["total"],
            kv_cache_bytes=m.language_model.kv_cache_bytes(fl["cache_lengths"]),
            prefill_ms=1000 * prefill_s, decode_ms_per_token=dec_ms, wall_s=time.perf_counter() - t0))
        log.info("%s: acc %.3f, %d image tokens, %.2f GFLOP, prefill %.0f ms%s", s.label, acc, fl["image_tokens"],
                 fl["total"] / 1e9, 1000 * prefill_s, "" if dec_ms is None else f", decode {dec_ms:.1f} ms/token")
    base = rows[0]
    for r in rows:
        r["flop_ratio"] = base["total_flops"] / r["total_flops"]
        r["real_flop_ratio"] = base["total_flops"] / r["real_total_flops"]
        r["prefill_speedup"] = base["prefill_ms"] / r["prefill_ms"]
        r["kv_ratio"] = base["kv_cache_bytes"] / r["kv_cache_bytes"]
        if r["decode_ms_per_token"] and base["decode_ms_per_token"]:
            r["decode_speedup"] = base["decode_ms_per_token"] / r["decode_ms_per_token"]
    meta = dict(config_name=cfg.config_name, train_config=cfg.train_config, projector=proj_src, num_test=n,
                batch_size=int(cfg.batch_size), base_image_tokens=base_k, text_tokens=text_tokens,
                device=str(jax.devices()[0].platform), total_s=time.perf_counter() - start)
    result = dict(meta=meta, points=rows)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    save_config(tcfg, out_dir, "train_config.json")
    (out_dir / "points.json").write_text(json.dumps(result, indent=2, default=str))
    write_csv(rows, out_dir / "points.csv")
    (out_dir / "table.md").write_text(markdown_table(result))
    plot_pareto(rows, out_dir / "pareto.png")
    result["paths"] = {k: str(out_dir / k) for k in ("points.json", "points.csv", "table.md", "pareto.png")}
    return result


COLUMNS = ("label", "accuracy", "image_tokens", "llm_tokens_after", "real_llm_tokens_after", "total_flops",
           "flop_ratio", "real_flop_ratio", "xla_ratio", "prefill_ms", "prefill_speedup", "decode_ms_per_token", "decode_speedup", "kv_cache_bytes", "kv_ratio")


def write_csv(rows, path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        skip = ("spec", "correct", "accuracy_by_family")
        w = csv.DictWriter(f, fieldnames=[c for c in rows[0] if c not in skip], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: v for k, v in r.items() if k not in skip})


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown_table(result) -> str:
    m = result["meta"]
    head = (f"VLM sweep `{m['config_name']}`: {m['num_test']} examples, batch {m['batch_size']}, "
            f"{m['base_image_tokens']} image tokens unreduced, projector {m['projector']}, {m['device']}\n\n")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in result["points"]:
        vals = [r.get(c) for c in COLUMNS]
        vals[COLUMNS.index("total_flops")] = f"{r['total_flops'] / 1e9:.2f} G"
        lines.append("| " + " | ".join(_fmt(v) for v in vals) + " |")
    return head + "\n".join(lines) + "\n" + family_table(result["points"]) + paired_table(result["points"])


def family_table(rows) -> str:
    """Accuracy per question family (``accuracy_by_family``), one row per setting; empty when the data has none."""
    fams = list(dict.fromkeys(f for r in rows for f in (r.get("accuracy_by_family") or {})))
    if not fams:
        return ""
    lines = ["\nAccuracy by question family:\n", "| setting | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for r in rows:
        by = r.get("accuracy_by_family") or {}
        lines.append(f"| {r['label']} | " + " | ".join(_fmt(by.get(f)) for f in fams) + " |")
    return "\n".join(lines) + "\n"


def paired_table(rows) -> str:
    """Every setting against random pruning at the same budget, on the same examples (:mod:`evaluation.paired`):
    the accuracy difference, its paired standard error, wins / losses and the exact McNemar p-value. Random at the
    same insertion point is the reference where the sweep has it, else random at the connector."""
    from evaluation.paired import paired_difference

    randoms = {(r["point"], round(r["fraction"], 6)): r for r in rows if r["method"] == "random" and r.get("correct")}
    lines = []
    for r in rows:
        if r["method"] in ("none", "random") or not r.get("correct"):
            continue
        key = round(r["fraction"], 6)
        ref = randoms.get((r["point"], key)) or randoms.get(("connector", key))
        if ref is None or len(ref["correct"]) != len(r["correct"]):
            continue
        d = paired_difference(r["correct"], ref["correct"])
        lines.append(f"| {r['label']} | {ref['label']} | {100 * d['diff']:+.1f} | {100 * d['se']:.1f} | "
                     f"{d['wins']} / {d['losses']} | {d['p']:.3g} |")
    if not lines:
        return ""
    head = ("\nPaired against random at the same budget (same examples; points of accuracy):\n\n"
            "| setting | against | difference | paired SE | wins / losses | McNemar p |\n|---|---|---|---|---|---|\n")
    return head + "\n".join(lines) + "\n"


def plot_pareto(rows, path) -> None:
    """Accuracy against total FLOPs (tower + connector + prefill), one marker per point, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = {"none": "*", "vision": "o", "connector": "s", "llm": "^"}
    methods = sorted({r["method"] for r in rows})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for (point, method) in sorted({(r["point"], r["method"]) for r in rows}):
        pts = sorted([r for r in rows if r["point"] == point and r["method"] == method], key=lambda r: r["total_flops"])
        ax.plot([r["total_flops"] / 1e9 for r in pts], [r["accuracy"] for r in pts], marker=markers[point],
                color=colours[method], label=f"{POINT_NAMES.get(point, point)}:{method}", ms=8 if point == "none" else 5,
                lw=1)
    ax.set_xlabel("GFLOPs per example (tower + connector + prefill)")
    ax.set_ylabel("answer accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["Setting", "settings_for", "resolve_learned", "layer_flops", "real_prefill_flops", "run", "load_projector",
           "export_projector", "markdown_table", "accuracy_by_family", "family_table", "paired_table", "plot_pareto"]
