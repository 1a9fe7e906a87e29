"""Train a ViT (or the VLM) with token reduction in the loop: sharded, resumable, logged.

    python train.py --config vit_fmnist train.steps=100 model.reduction.r=4
    python train.py --config vit_fmnist --workdir runs/fm_tome model.reduction.method=pitome model.reduction.keep_ratio=0.9
    python train.py --help                                   # presets, override syntax, every method and option

Overrides are ``field.sub=value`` (see ``configs/__init__.py``); a misspelt field or reduction option raises an
error naming it. The resolved config is written to ``<workdir>/config.json`` and stored in every checkpoint. The
training library is the ``training`` package (builders, optimizer, tasks, steps, mesh, checkpoints, trainer);
this file is its command line, and re-exports it so ``import train; train.Trainer(cfg, workdir)`` works.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import configs
from training import *  # noqa: F401,F403  (the training library, re-exported for ``import train``)
from training import Trainer, maybe_initialize_distributed

log = logging.getLogger("tokenreduce.train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=configs.help_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="preset name in configs/ (e.g. vit_fmnist) or a .py path")
    p.add_argument("--workdir", default="", help="output folder (default runs/<config name>)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="field.sub=value config overrides")
    return p.parse_intermixed_args(argv)   # overrides may follow --workdir


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = configs.load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg)
        return {}
    maybe_initialize_distributed(cfg.mesh.distributed)
    workdir = args.workdir or os.path.join("runs", cfg.config_name)
    summary = Trainer(cfg, workdir).train()
    print(json.dumps(summary, default=str))
    return summary


if __name__ == "__main__":
    main()
