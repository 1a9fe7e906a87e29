"""The :class:`Trainer`: mesh over all devices (batch on ``"data"``), grain input, Orbax checkpoints,
JSON-lines metrics (mirrored to TensorBoard when a writer is installed), periodic evaluation, tqdm progress,
optional ``jax_debug_nans`` and ``jax.transfer_guard``."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import signal
import threading
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import configs
import data as data_lib


from training.builders import (_get, build_model, frozen_sources, layer_reducers, reduction_spec,
                               resolve_learned_trainable)
from training.checkpoints import Checkpoints, FrozenSplit
from training.errors import NonFiniteLossError, TrainingInterrupted
from training.mesh import make_mesh, put_global, state_shardings
from training.optim import build_optimizer, learning_rate_schedule, trainable_labels
from training.resume import check_resume_config, prepare_metrics, write_run_config
from training.steps import make_eval_step, make_train_step
from training.tasks import make_task

log = logging.getLogger("tokenreduce.train")


# -- the trainer --------------------------------------------------------------------------------------------

TRANSFER_GUARDS = ("allow", "log", "disallow")


@contextlib.contextmanager
def sigterm_raises():
    """Within the block, SIGTERM raises :class:`TrainingInterrupted` (a ``KeyboardInterrupt``) in the main thread,
    so the run's ``finally`` finishes its checkpoint saves; a second SIGTERM acts as before. A no-op outside the
    main thread (signal handlers can only be installed there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if previous is None else previous

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, previous)
        raise TrainingInterrupted("SIGTERM: training stopped; pending checkpoint saves are being finished")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class TensorBoardWriter:
    """Mirrors the JSON-lines records as TensorBoard scalars: train records under ``train/<key>``, evaluation
    records (``eval_*`` keys) under ``eval/<key>``; non-numeric fields and ``step`` are skipped."""

    def __init__(self, writer, backend: str):
        self.writer, self.backend = writer, backend

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for k, v in record.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            tag = f"eval/{k[len('eval_'):]}" if k.startswith("eval_") else f"train/{k}"
            self.writer.add_scalar(tag, float(v), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(logdir: pathlib.Path) -> Optional[TensorBoardWriter]:
    """A :class:`TensorBoardWriter` on ``logdir`` with ``tensorboardX`` or else ``torch.utils.tensorboard`` (which
    needs the ``tensorboard`` package); ``None`` (logged once) when neither imports."""
    try:
        from tensorboardX import SummaryWriter

        backend = "tensorboardX"
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter

            backend = "torch.utils.tensorboard"
        except ImportError:
            log.info("train.tensorboard: no TensorBoard writer importable (pip install tensorboardX, or "
                     "'tokenreduce[tensorboard]'); metrics go to metrics.jsonl only")
            return None
    logdir.mkdir(parents=True, exist_ok=True)
    log.info("TensorBoard scalars -> %s (%s)", logdir, backend)
    return TensorBoardWriter(SummaryWriter(str(logdir)), backend)  # logdir is positional in both


def token_table(tokens_per_layer) -> str:
    """``[(attention, mlp), ...]`` per layer -> an aligned text table (layers where the count changes are marked)."""
    rows = ["  layer  attention  mlp"]
    prev = None
    for i, (a, m) in enumerate(tokens_per_layer):
        mark = "  <- reduced" if (prev is not None and a != prev) or a != m else ""
        rows.append(f"  {i:5d}  {int(a):9d}  {int(m):3d}{mark}")
        prev = m
    return "\n".join(rows)


def config_lines(cfg) -> str:
    """The resolved config, one line per top-level block (as saved in ``config.json``)."""
    d = cfg.to_dict()
    return "\n".join(f"  {k}: {json.dumps(v, default=str, sort_keys=True)}" for k, v in d.items())


def check_classes(cfg, source, split: str) -> None:
    """A classification run's data must have as many classes as the model's head (``model.vit.num_classes``):
    :class:`configs.ConfigError` naming both counts when the source states a different class count, or holds a
    label the head cannot output. Sources that state neither are not checked."""
    if cfg.task != "classification":
        return
    head = int(cfg.model.vit.num_classes)
    declared, labels = data_lib.class_count(source)
    names = getattr(source, "classes", None)
    where = f"data.name={cfg.data.name!r} split {split!r} ({source!r})"
    if declared is not None and declared != head:
        listing = f" {list(names)[:10]}" if names is not None else ""
        raise configs.ConfigError(
            f"{where} has {declared} classes{listing} but the model's head has model.vit.num_classes={head} "
            f"outputs; set model.vit.num_classes={declared} (a new head) or point data.path at the matching data")
    if labels is not None and labels > head:
        raise configs.ConfigError(f"{where} has label {labels - 1}, but the model's head has model.vit.num_classes="
                                  f"{head} outputs (labels 0..{head - 1}); set model.vit.num_classes >= {labels}")


class Trainer:
    """Runs ``cfg.train.steps`` steps in ``workdir`` (resuming from its checkpoints when present).

    ``model_fn(cfg) -> nnx.Module`` and ``source_fn(data_cfg, split) -> source`` can replace the defaults
    (tests use tiny models). ``mesh`` defaults to all devices."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                 model_fn: Optional[Callable] = None, source_fn: Optional[Callable] = None,
                 mesh: Optional[jax.sharding.Mesh] = None):
        self.cfg = cfg
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.model_fn = model_fn or build_model
        self.source_fn = source_fn or data_lib.make_source
        self.mesh = mesh or make_mesh(_get(cfg.mesh, "num_devices", 0))
        self.is_main = jax.process_index() == 0
        self.history: list[dict] = []
        self.skip_stats = None

    # - setup -


    def _put_batch(self, batch: dict) -> dict:
        P = jax.sharding.PartitionSpec
        sh = jax.sharding.NamedSharding(self.mesh, P("data"))
        return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}

    def train(self) -> dict:
        """Run (or resume) the training; returns the summary. ``train.debug_nans`` turns ``jax_debug_nans`` on for
        the run (restored afterwards); ``train.transfer_guard`` wraps the step loop in :func:`jax.transfer_guard`;
        ``train.tensorboard`` mirrors the metrics to ``<workdir>/tensorboard/``."""
        cfg = self.cfg
        configs.check_train_config(cfg)  # before anything is built or compiled
        configs.check_data_provided(cfg)  # a preset on the user's data says where it goes, before the model
        guard = str(_get(cfg.train, "transfer_guard", "allow"))
        if guard not in TRANSFER_GUARDS:
            raise ValueError(f"train.transfer_guard must be one of {TRANSFER_GUARDS}, got {guard!r}")
        debug_nans = bool(_get(cfg.train, "debug_nans", False))
        previous = bool(jax.config.jax_debug_nans)
        if debug_nans:
            jax.config.update("jax_debug_nans", True)
            log.info("train.debug_nans: jax_debug_nans is on for this run (slow: every op is checked for NaN)")
        self._tb = None
        if bool(_get(cfg.train, "tensorboard", False)) and self.is_main:
            self._tb = open_tensorboard(self.workdir / "tensorboard")
        try:
            with sigterm_raises():
                return self._train(guard)
        finally:
            if debug_nans:
                jax.config.update("jax_debug_nans", previous)
            if self._tb is not None:
                self._tb.close()
                self._tb = None

    def _train(self, guard: str) -> dict:
        """Every exit (return, exception, NonFiniteLossError, KeyboardInterrupt, SIGTERM) waits for the pending
        asynchronous checkpoint saves, so the last saved step is complete on disk."""
        cfg = self.cfg
        t_setup = time.time()
        with cfg.unlocked():
            resolve_learned_trainable(cfg)
        ckpt = Checkpoints(self.workdir / "checkpoints", keep=int(cfg.checkpoint.keep),
                           use_async=bool(cfg.checkpoint.use_async))
        ok = False
        try:
            out = self._run(ckpt, guard, t_setup)
            ok = True
            return out
        finally:
            try:
                ckpt.close()
            except Exception:
                if ok:
                    raise
                log.exception("finishing the pending checkpoint saves after an error failed")

    def _run(self, ckpt: Checkpoints, guard: str, t_setup: float) -> dict:
        cfg = self.cfg
        allow_change = bool(_get(cfg.train, "allow_config_change", False))
        if cfg.checkpoint.resume:   # refuse a changed config before the model is built
            newest = ckpt.peek_meta()
            if newest is not None:
                check_resume_config(newest[1].get("config"), cfg.to_dict(), step=newest[0], workdir=self.workdir,
                                    allow=allow_change)
        source = self.source_fn(cfg.data, cfg.data.train_split)   # read (and class-checked) before the model
        check_classes(cfg, source, cfg.data.train_split)
        model = self.model_fn(cfg)
        reducers = layer_reducers(cfg, model)
        task = make_task(cfg, model)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tx = build_optimizer(cfg, params)
        schedule = learning_rate_schedule(cfg)
        state = {"params": params, "rest": rest, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
        if float(_get(cfg.train, "ema_decay", 0.0)) > 0:   # model EMA: starts as a copy, saved with the state
            state["ema"] = jax.tree.map(jnp.array, params)
        shardings = state_shardings(state, self.mesh, fsdp=bool(cfg.mesh.fsdp))
        state = put_global(state, shardings)
        n_params = sum(x.size for x in jax.tree.leaves(params))
        split = self._frozen_split(cfg, params)
        frozen_record = split.record(state["params"]) if split.active else None

        data_state = None
        start = 0
        diff: dict = {}
        if cfg.checkpoint.resume:
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
            found = ckpt.restore(lambda m: split.view(abstract) if m.get("frozen") is not None else abstract,
                                 fallback=bool(cfg.checkpoint.fallback))
            if found is not None:
                start, restored, data_state, saved_meta = found
                if saved_meta.get("frozen") is not None:   # trainable state only: the frozen parts come from sources
                    split.check(saved_meta["frozen"], state["params"], step=start, directory=ckpt.directory)
                    state = split.merge(state, restored)
                else:                                      # every parameter (older runs, checkpoint.save_frozen)
                    state = restored
                # the restored step may be an older one (fallback): check against its own config
                diff = check_resume_config(saved_meta.get("config"), cfg.to_dict(), step=start,
                                           workdir=self.workdir, allow=allow_change)
                log.info("resumed from step %d (%s)", start, ckpt.directory / str(start))
        self.resumed_from = start
        total = int(cfg.train.steps)
        if start > total:
            raise configs.ConfigError(f"train.steps={total} is below the restored checkpoint step {start} in "
                                      f"{self.workdir}; pass train.steps >= {start} (or a new --workdir)")
        metrics_path = self.workdir / "metrics.jsonl"
        if self.is_main:
            write_run_config(cfg.to_dict(), self.workdir, start, diff)
            prepare_metrics(metrics_path, start)

        self.skip_stats = getattr(source, "stats", None)
        aug = data_lib.augment_from_config(cfg.data.augment, cfg.data)
        ds = data_lib.train_dataset(source, batch_size=int(cfg.train.batch_size), seed=int(cfg.seed), augment=aug,
                                    num_threads=int(cfg.data.num_threads))
        it = iter(ds)
        if data_state is not None:
            it.set_state(data_state)
        eval_source = (self.source_fn(cfg.data, cfg.data.eval_split)
                       if cfg.train.eval_every > 0 or cfg.train.eval_at_end else None)
        if eval_source is not None:
            check_classes(cfg, eval_source, cfg.data.eval_split)

        P = jax.sharding.PartitionSpec
        repl = jax.sharding.NamedSharding(self.mesh, P())
        train_step = make_train_step(graphdef, task, tx, cfg, reducers, schedule)

        def keyed_step(state, batch, base_key):
            # The per-step key fold_in(key(seed), step) is formed on device from state["step"] (the same key as
            # folding the Python step in), so the loop passes no host scalar (train.transfer_guard="disallow").
            return train_step(state, batch, jax.random.fold_in(base_key, state["step"]))

        step_fn = jax.jit(keyed_step, donate_argnums=0, in_shardings=(shardings, None, repl),
                          out_shardings=(shardings, repl))
        eval_fn = jax.jit(make_eval_step(graphdef, task, cfg, reducers))
        self._eval = lambda st, src: self.evaluate(eval_fn, st, src)

        tpl = None
        if reducers is not None and hasattr(model, "tokens_per_layer"):
            tpl = model.tokens_per_layer(int(cfg.model.vit.image_size), reducers)
        self._log_start(model, n_params, tpl, start, total)
        base_rng = put_global(jax.random.key(int(cfg.seed)), repl)
        meta = {"config": cfg.to_dict(), "config_name": cfg.get("config_name", "")}
        if frozen_record is not None:
            meta["frozen"] = frozen_record
        saved_view = split.view if split.active else (lambda st: st)

        bar = None
        if self.is_main and cfg.train.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc="train")
        tokens_kept = None if not tpl else int(tpl[-1][1])
        profile = tuple(int(v) for v in (cfg.train.get("profile_steps") or ()))
        profiling = False
        bs = int(cfg.train.batch_size)
        pending = None  # (step, metrics) of the previous step, checked one step late to keep dispatch async
        t_last, n_last = time.time(), start
        log.info("setup took %.1fs", time.time() - t_setup)
        summary = {}
        if guard != "allow":
            log.info("train.transfer_guard=%s: implicit host<->device transfers in the step loop are %s", guard,
                     "logged" if guard == "log" else "refused")
        log_every, ckpt_every = int(cfg.train.log_every), int(cfg.checkpoint.every)   # 0: only at the end
        try:
            with open(metrics_path, "a") as mfile, jax.transfer_guard(guard):
                for step in range(start, total):
                    if profile and step == profile[0]:
                        jax.profiler.start_trace(str(self.workdir / "profile"))
                        profiling = True
                    batch = self._put_batch(next(it))
                    state, metrics = step_fn(state, batch, base_rng)
                    if pending is not None:
                        self._check_finite(*pending)
                    pending = (step, metrics)
                    done = step + 1
                    if profiling and done == min(profile[1], total):
                        jax.block_until_ready(state)
                        jax.profiler.stop_trace()
                        profiling = False
                        log.info("profiler trace of steps %d-%d in %s (TensorBoard's profile plugin or Perfetto "
                                 "reads it)", profile[0], done - 1, self.workdir / "profile")
                    if (log_every > 0 and done % log_every == 0) or done == total:
                        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        self._check_finite(step, metrics)
                        now = time.time()
                        m.update(step=done, images_per_s=(done - n_last) * bs / max(now - t_last, 1e-9),
                                 step_time_s=(now - t_last) / max(done - n_last, 1))
                        if self.skip_stats is not None:
                            m["skipped_records"] = self.skip_stats.skipped
                        t_last, n_last = now, done
                        self._write(mfile, m)
                        if bar is not None:
                            post = dict(loss=f"{m['loss']:.4f}", acc=f"{m.get('accuracy', 0):.3f}")
                            learned = sorted((k for k in m if k.startswith("kept_tokens_L")),
                                             key=lambda k: int(k[len("kept_tokens_L"):]))
                            if learned:                     # a learned reducer's mean valid tokens per image
                                post["tok"] = f"{m[learned[-1]]:.1f}"
                            elif tokens_kept is not None:
                                post["tok"] = str(tokens_kept)
                            post["img_s"] = f"{m['images_per_s']:.0f}"
                            bar.set_postfix(**post)
                    if bar is not None:
                        bar.update(1)
                    if cfg.train.eval_every > 0 and done % int(cfg.train.eval_every) == 0 and done != total:
                        self._write(mfile, self._eval(state, eval_source) | {"step": done})
                    if (ckpt_every > 0 and done % ckpt_every == 0) or done == total:
                        self._check_finite(step, metrics)   # never save a step whose loss is not finite
                        ckpt.save(done, saved_view(state), it.get_state(), meta)
                    if done == int(cfg.train.crash_after_step):
                        ckpt.wait()  # simulate a kill right after the checkpoint landed
                        mfile.flush()
                        os._exit(3)
                if pending is not None:
                    self._check_finite(*pending)
                if eval_source is not None and (cfg.train.eval_at_end or cfg.train.eval_every > 0):
                    ev = self._eval(state, eval_source) | {"step": total}
                    self._write(mfile, ev)
                    summary.update(ev)
        finally:
            if profiling:
                jax.profiler.stop_trace()
            if bar is not None:
                bar.close()
        ckpt.wait()   # the final checkpoint is complete before the summary says the run is done
        self.state = state
        self.graphdef = graphdef
        summary.update(steps=total, resumed_from=start, workdir=str(self.workdir))
        if self.history:
            last_train = [h for h in self.history if "loss" in h]
            if last_train:
                summary.update(final_loss=last_train[-1]["loss"])
        if self.is_main:
            (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary

    # - pieces -

    def _frozen_split(self, cfg, params) -> FrozenSplit:
        """A VLM run with frozen parameters saves only its trainable state (unless ``checkpoint.save_frozen``); the
        frozen tower / LM are recorded by source and digest (:class:`training.checkpoints.FrozenSplit`)."""
        labels = trainable_labels(params, cfg) if (cfg.optim.frozen or cfg.optim.trainable) else None
        vlm = cfg.model.kind == "vlm"
        active = vlm and not bool(_get(cfg.checkpoint, "save_frozen", False))
        split = FrozenSplit(params, labels, active=active, sources=frozen_sources(cfg) if vlm else None)
        if split.active:
            n = sum(split.frozen)
            log.info("checkpoints hold the trainable state only: %d frozen parameter arrays are rebuilt from their "
                     "sources on resume (checkpoint.save_frozen=True saves them too)", n)
        return split

    def evaluate(self, eval_fn, state, source) -> dict:
        cfg = self.cfg
        sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        extra: dict[str, float] = {}
        limit = int(cfg.data.eval_limit) or None
        t0 = time.time()
        for batch in data_lib.eval_batches(source, batch_size=int(cfg.train.eval_batch_size), limit=limit):
            params = state["ema"] if "ema" in state else state["params"]   # train.ema_decay > 0: the EMA weights
            out = jax.device_get(eval_fn(params, state["rest"], self._put_batch(batch)))
            for k in sums:
                sums[k] += float(out[k])
            for k, v in out.get("extra", {}).items():
                extra[k] = extra.get(k, 0.0) + float(v)
        n = max(sums["count"], 1.0)
        record = {"split": cfg.data.eval_split, "eval_loss": sums["loss"] / n, "eval_accuracy": sums["correct"] / n,
                  "eval_examples": int(sums["count"]), "eval_time_s": time.time() - t0}
        record.update({f"eval_{k}": v / n for k, v in extra.items()})
        if "ema" in state:
            record["eval_weights"] = "ema"
        return record

    def _check_finite(self, step, metrics) -> None:
        if not self.cfg.train.check_finite:
            return
        loss = float(jax.device_get(metrics["loss"]))
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss} at step {step + 1} (config {self.cfg.get('config_name', '?')}, workdir "
                f"{self.workdir}); stopping. Try a lower optim.lr, optim.clip_norm > 0 or "
                f"train.compute_dtype=float32. Checkpoints before this step are in {self.workdir / 'checkpoints'}.")

    def _write(self, f, record: dict) -> None:
        self.history.append(record)
        if self.is_main:
            f.write(json.dumps(record) + "\n")
            f.flush()
            if getattr(self, "_tb", None) is not None:
                self._tb.write(record)
            if "eval_accuracy" in record:
                log.info("step %d: %s accuracy %.4f loss %.4f", record["step"], record["split"],
                         record["eval_accuracy"], record["eval_loss"])

    def _log_start(self, model, n_params, tpl, start, total) -> None:
        cfg = self.cfg
        devs = self.mesh.devices.reshape(-1)
        log.info("config %s -> workdir %s (config.json, metrics.jsonl, checkpoints/)", cfg.get("config_name", "?"),
                 self.workdir.resolve())
        log.info("model %s: %.2fM parameters; data %s; %d device(s) %s, %d process(es); fsdp=%s; batch %d",
                 cfg.model.kind, n_params / 1e6, cfg.data.name, len(devs), devs[0].platform, jax.process_count(),
                 bool(cfg.mesh.fsdp), int(cfg.train.batch_size))
        if tpl is not None:
            log.info("reduction %s: tokens per layer\n%s", reduction_spec(cfg), token_table(tpl))
        if getattr(model, "learned_layers", ()):
            log.info("learned reducers at layers %s: training mode in training, inference mode (tokens per layer above) "
                     "in evaluation; optim.trainable=%s", model.learned_layers,
                     tuple(cfg.optim.trainable) or "everything")
        log.info("resolved config (saved as %s):\n%s", self.workdir / "config.json", config_lines(cfg))
        log.info("steps %d -> %d", start, total)
