"""The ``eval.py`` command line (also installed as ``tokenreduce-eval``). Token-reduction trade-off sweeps: accuracy, analytic and XLA FLOPs, throughput, tokens per layer.

    python eval.py                                    # default: DINOv2-small + Fashion-MNIST linear probe
    python eval.py --config eval_quick                # tiny smoke sweep
    python eval.py --config eval_dinov2_fmnist num_test=500 methods="('tome','pitome')"
    python eval.py --config eval_vlm_smol             # VLM: DINOv2-small + SmolLM2, methods x budgets x points

Every method is compared at equal analytic FLOPs: for each target fraction of the unreduced FLOPs the
budget solver (``evaluation.budget``) picks the method's setting closest from below. Results go to
``results/eval/<config_name>/`` (``points.json``, ``points.csv``, ``table.md``, PNG plots, the resolved
``config.json``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time


def parse_args(argv=None):
    from configs import help_epilog

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0].split(". ", 1)[-1], epilog=help_epilog("eval"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="eval_dinov2_fmnist", help="config name in configs/ or a path")
    p.add_argument("--out", default=None, help="results folder (default results/eval/<config_name>)")
    p.add_argument("--checkpoint", default=None, help="evaluate a train.py checkpoint (sets backbone=checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table on stdout")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="config overrides field=value")
    return p.parse_args(argv)


def check_methods(cfg) -> None:
    """Every method the config requests (``methods``, and the names under ``options``) is registered and can run
    where it is asked to: :class:`reduction.SpecError` otherwise, before any model or data is loaded."""
    from reduction.reducers import SpecError, available_methods, method_info

    for name in (cfg.get("options") or {}):
        method_info(name)
    if cfg.get("kind", "vit") == "atp_adaptive":    # static controls at one ATP layer
        for name in tuple(cfg.static_methods):
            method_info(name)
        return
    if cfg.get("kind", "vit") == "vlm_anyres":      # explicit specs: checked when each plan is built
        from evaluation.vlm_anyres import VARIANTS

        for name in tuple(cfg.get("variants", ()) or ()):
            if name not in VARIANTS:
                raise SpecError(f"variants: unknown {name!r}; variants: {sorted(VARIANTS)}")
        for setting in cfg.get("settings", ()) or ():
            if setting[2] is not None:
                method_info(dict(setting[2])["method"])
        return
    if cfg.get("kind", "vit") == "vlm":
        from evaluation.vlm_sweep import POINT_NAMES

        for point, names in (cfg.methods or {}).items():
            if point not in POINT_NAMES:
                raise SpecError(f"methods.{point}: unknown point; points: {sorted(POINT_NAMES)}")
            for name in tuple(names or ()):
                method_info(name)
                if name not in available_methods(point):
                    raise SpecError(f"methods.{point}: method {name!r} cannot run at the {point!r} point; "
                                    f"methods for {point!r}: {available_methods(point)}")
        return
    from evaluation.sweep import resolve_methods

    resolve_methods(tuple(cfg.methods))


def run(cfg, out_dir: pathlib.Path, *, progress: bool = True) -> dict:
    """Build the backbone and data named by ``cfg``, sweep, and write every output to ``out_dir``. Configs with
    ``kind="vlm"`` run the VLM sweep (:func:`evaluation.vlm_sweep.run`)."""
    if cfg.get("kind", "vit") == "vlm_anyres":
        from evaluation import vlm_anyres

        return vlm_anyres.run(cfg, out_dir, progress=progress)
    if cfg.get("kind", "vit") == "atp_adaptive":
        from configs import save_config
        from evaluation import atp_adaptive

        result = atp_adaptive.run(cfg, out_dir, progress=progress)
        save_config(cfg, out_dir)
        return {"meta": {"total_s": result["total_s"]}, "summary": result}
    if cfg.get("kind", "vit") == "vlm":
        from evaluation import vlm_sweep

        return vlm_sweep.run(cfg, out_dir, progress=progress)
    from configs import save_config, spec_from_node
    from evaluation import backbones, data, plots, report
    from evaluation import builtin  # noqa: F401 - registers the repo's backbones
    from evaluation.sweep import SweepSettings, run_sweep

    start = time.perf_counter()
    backbone = backbones.build_backbone(cfg.backbone, cfg)
    train, test, num_classes = data.load_dataset(cfg.dataset, num_train=cfg.num_train, num_test=cfg.num_test,
                                                 seed=cfg.seed)
    settings = SweepSettings(
        methods=tuple(cfg.methods), targets=tuple(float(t) for t in cfg.targets), batch_size=cfg.batch_size,
        throughput_batch=cfg.throughput_batch, warmup=cfg.warmup, repeats=cfg.repeats,
        flop_tolerance=cfg.flop_tolerance, seed=cfg.seed, l2_grid=tuple(cfg.probe_l2_grid),
        options=tuple((m, spec_from_node(node)) for m, node in (cfg.get("options") or {}).items()),
    )
    result = run_sweep(backbone, train, test, num_classes=num_classes, settings=settings, progress=progress)
    result["meta"].update(config_name=cfg.config_name, dataset=cfg.dataset, total_s=time.perf_counter() - start)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    paths = report.write_all(result, out_dir)
    paths.update(plots.plot_all(result, out_dir))
    if cfg.visualize:
        from evaluation import visual

        paths.update(visual.save_visualisations(backbone, result, test, out_dir, cfg))
    result["meta"]["total_s"] = time.perf_counter() - start
    report.write_json(result, out_dir / "points.json")
    result["paths"] = {k: str(v) for k, v in paths.items()}
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    from configs import load_config
    from evaluation import report

    overrides = list(args.overrides)
    if args.checkpoint:
        overrides += ["backbone=checkpoint", f"checkpoint={args.checkpoint}"]
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(cfg)
        return 0
    from reduction.reducers import SpecError

    try:
        check_methods(cfg)
    except SpecError as err:           # an unknown requested method fails the run, named, before any work
        print(f"eval.py: error: {err}", file=sys.stderr)
        return 2
    default = pathlib.Path("results") / "eval" / cfg.config_name
    if cfg.get("kind", "vit") == "atp_adaptive":
        default = pathlib.Path("results") / "atp_adaptive" / pathlib.Path(str(cfg.checkpoint)).name
    out_dir = pathlib.Path(args.out or cfg.out_dir or default)
    result = run(cfg, out_dir, progress=not args.quiet)
    if not args.quiet:
        if cfg.get("kind", "vit") == "vlm":
            from evaluation.vlm_sweep import markdown_table

            print(markdown_table(result))
        elif cfg.get("kind", "vit") == "atp_adaptive":
            from evaluation.atp_adaptive import markdown_table

            print(markdown_table(result["summary"]))
        elif cfg.get("kind", "vit") == "vlm_anyres":
            from evaluation.vlm_anyres import markdown_table

            print(markdown_table(result))
        else:
            print(report.markdown_table(result))
        print(f"wrote {out_dir} in {result['meta']['total_s']:.0f} s")
    return 0


