"""Whole-pipeline VLM timing on the real model: DINOv2-small -> projector -> SmolLM2-135M (``configs/vlm_smol.py``).

At batch 8 (``--batch``), for the unreduced model and for DART and FastV inside the LLM, ToMe in the tower and
pooling at the connector, each keeping 1/3, 2/9 and 1/9 of the image tokens: the time of the compiled scoring
forward (tower + connector + prefill) and of one decode step over the reduced KV cache, against the analytic FLOP
and cache-size ratios, all measured in one process (:mod:`evaluation.vlm_sweep`; accuracy on the few examples used
here is not meaningful: see ``eval.py --config eval_vlm_smol``).

Targets (issue 14): DART's prefill speed-up at 1/9 kept >= 0.8 of its FLOP ratio; decode with the reduced cache
faster per token than without by at least half the cache-size ratio's gain.

    python bench/bench_vlm.py                       # writes results/bench/vlm/{points.json,table.md,...}
    python bench/bench_vlm.py --quick               # the tiny random VLM of configs/vlm_connector.py
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--out", default="results/bench/vlm")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype of the whole VLM (train.compute_dtype; parameters stay float32)")
    ap.add_argument("--quick", action="store_true", help="tiny random VLM (proves the script works)")
    args = ap.parse_args(argv)

    from configs import load_config
    from evaluation import vlm_sweep

    cfg = load_config("eval_vlm_quick" if args.quick else "eval_vlm_smol")
    with cfg.unlocked():
        cfg.config_name = "bench_vlm"
        cfg.num_test = args.batch
        cfg.batch_size = args.batch
        cfg.repeats = args.repeats
        cfg.decode_steps = args.decode_steps
        cfg.methods.vision = ("tome",)
        cfg.methods.connector = ("pool",)
        cfg.methods.llm = ("dart", "fastv")
        if args.dtype != "float32":
            cfg.train_overrides = tuple(cfg.train_overrides) + (f"train.compute_dtype={args.dtype}",)
        if not pathlib.Path(str(cfg.projector)).exists():
            cfg.projector = ""          # timing does not depend on the projector's weights
    result = vlm_sweep.run(cfg, pathlib.Path(args.out), progress=True)
    rows = []
    for r in result["points"]:
        gain = r["kv_ratio"] - 1.0
        rows.append(dict(label=r["label"], image_tokens=r["image_tokens"], flop_ratio=r["flop_ratio"],
                         prefill_speedup=r["prefill_speedup"], speedup_over_flop_ratio=r["prefill_speedup"] / r["flop_ratio"],
                         kv_ratio=r["kv_ratio"], decode_speedup=r.get("decode_speedup"),
                         decode_gain_over_half_kv_gain=None if not gain or not r.get("decode_speedup") else
                         (r["decode_speedup"] - 1.0) / (0.5 * gain)))
    summary = pathlib.Path(args.out) / "summary.json"
    summary.write_text(json.dumps(dict(meta=result["meta"], rows=rows), indent=2))
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("-" if r[c] is None else (f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]))
                                for c in cols) + " |")
    print(f"wrote {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
