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


from training import *  # noqa: F401,F403  (the training library, re-exported for ``import train``)
from training.cli import main, parse_args  # noqa: F401

if __name__ == "__main__":
    main()
