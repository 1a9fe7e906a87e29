"""HoT's learned token recovery against ``reduction.unmerge`` on the dense ``hot_dense`` preset, at the same pruning.

    python -m bench.hot_dense                          # 4 runs of configs/hot_dense.py (about 3 min each on 2 cores)
    python -m bench.hot_dense --steps 20 --quick       # a tiny run that proves the script works
    python -m bench.hot_dense --out runs/hot_dense     # where the runs and results.json go

Settings (each trains from scratch with ``train.py --config hot_dense``, same seed, data and schedule):

* ``hot``: DPC-kNN pruning after block 1 (21 of 64 patches), learned cross-attention recovery in the last block;
* ``unmerge``: the same pruning, no recovery module; every patch copies the output of its DPC-kNN centre;
* ``unmerge_drop``: the same pruning with ``represent="drop"``: pruned patches have no representative and get zero
  logits (a floor: what the source map alone gives without the cluster assignment);
* ``full``: no pruning (the 65-token model, the ceiling).

Reported per setting: test patch accuracy, dataset mIoU over the 9 classes (from the ``eval_inter_<c>`` /
``eval_union_<c>`` sums of :class:`training.tasks.DenseTask`), the fraction of patches with a holding token, the
model's analytic FLOPs per image (``ViT.flops``) and the wall time.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import configs  # noqa: E402
import train  # noqa: E402
from training.tasks import dense_miou  # noqa: E402

SETTINGS = {
    "hot": [],
    "unmerge": ["model.recover.method=unmerge"],
    "unmerge_drop": ["model.recover.method=unmerge", "model.reduction.represent=drop"],
    "full": ["model.recover.method=unmerge", "model.reduction.method=none"],
}
COMMON = ["train.progress=False", "train.tensorboard=False", "checkpoint.use_async=False", "train.log_every=100"]


def run(name: str, extra: list, out: pathlib.Path) -> dict:
    overrides = COMMON + SETTINGS[name] + extra
    workdir = out / name
    cfg = configs.load_config("hot_dense", overrides)
    model = train.build_model(cfg)
    flops = model.flops(None, train.layer_reducers(cfg, model))
    t0 = time.time()
    train.main(["--config", "hot_dense", "--workdir", str(workdir), "train.allow_config_change=True", *overrides])
    wall = time.time() - t0
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    ev = [x for x in lines if "eval_accuracy" in x][-1]
    k = int(cfg.model.vit.num_classes)
    return {"setting": name, "overrides": SETTINGS[name] + extra, "patch_accuracy": ev["eval_accuracy"],
            "miou": dense_miou(ev, k), "covered": ev["eval_covered"], "eval_examples": ev["eval_examples"],
            "gflops_per_image": flops / 1e9, "wall_s": wall, "step": ev["step"]}


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/hot_dense")
    ap.add_argument("--steps", type=int, default=0, help="override train.steps (0 = the preset's)")
    ap.add_argument("--quick", action="store_true", help="tiny data, for a smoke test")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    args = ap.parse_args(argv)
    extra = [f"train.steps={args.steps}"] if args.steps else []
    if args.quick:
        extra += ["data.size=64", "data.eval_size=32", "train.batch_size=16", "train.eval_batch_size=32",
                  "optim.warmup_steps=1"]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run(name, extra, out) for name in args.settings.split(",")]
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"{'setting':14s} {'patch acc':>9s} {'mIoU':>7s} {'covered':>8s} {'GFLOPs':>7s} {'wall s':>7s}")
    for r in rows:
        print(f"{r['setting']:14s} {r['patch_accuracy']:9.4f} {r['miou']:7.4f} {r['covered']:8.3f} "
              f"{r['gflops_per_image']:7.4f} {r['wall_s']:7.1f}")
    return rows


if __name__ == "__main__":
    main()
