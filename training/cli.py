"""The ``train.py`` command line (also installed as ``tokenreduce-train``): ``--config`` preset, ``--workdir``,
``--print-config`` and ``field.sub=value`` overrides; ``--help`` lists the presets and every reduction method."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import configs
from training.mesh import maybe_initialize_distributed
from training.trainer import Trainer

__doc_cli__ = "Train a ViT (or the VLM) with token reduction in the loop: sharded, resumable, logged."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc_cli__, epilog=configs.help_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="preset name in configs/ (e.g. vit_fmnist) or a .py path")
    p.add_argument("--workdir", default="", help="output folder (default runs/<config name>)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="field.sub=value config overrides")
    return p.parse_intermixed_args(argv)   # overrides may come before or after the options


def main(argv=None) -> dict:
    args = parse_args(argv)
    # force: an imported library (absl, via orbax) may have installed a root handler already, which would drop
    # every log line of the run ("resumed from step N", devices, tokens per layer)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    cfg = configs.load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg)
        return {}
    configs.check_train_config(cfg)   # values that cannot work fail here, before devices or data are touched
    maybe_initialize_distributed(cfg.mesh.distributed)
    workdir = args.workdir or os.path.join("runs", cfg.config_name)
    summary = Trainer(cfg, workdir).train()
    print(json.dumps(summary, default=str))
    return summary


def cli() -> int:
    """Console-script entry point (``tokenreduce-train``): :func:`main`, exit status 0."""
    main()
    return 0
