"""Run every benchmark script in bench/ and write one summary.

    python bench/run_all.py            # full runs (slow; run on a quiet machine)
    python bench/run_all.py --quick    # each script's tiny run, proves they all work

Each ``bench/*.py`` (except this file and ``_private.py`` helpers) is run in its own process as
``python bench/<name>.py [--quick] --out <out>/<name>.json``. The summary lists, per script, the exit
status, the wall time, the JSON it wrote (embedded as is) and the tail of its output; it goes to
``<out>/summary.json`` and ``<out>/summary.md`` (default ``results/bench``). The exit status is non-zero if
any script failed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def discover(bench_dir: pathlib.Path, only=None) -> list[pathlib.Path]:
    scripts = sorted(p for p in bench_dir.glob("*.py")
                     if p.name != "run_all.py" and not p.name.startswith("_"))
    if only:
        scripts = [p for p in scripts if p.stem in only]
    return scripts


def run_script(script: pathlib.Path, out_dir: pathlib.Path, *, quick: bool, timeout: float) -> dict:
    out = out_dir / f"{script.stem}.json"
    if out.exists():
        out.unlink()  # never report a stale result as this run's
    cmd = [sys.executable, str(script)] + (["--quick"] if quick else []) + ["--out", str(out)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    wall = time.perf_counter() - start
    result = None
    if out.is_file():
        try:
            result = json.loads(out.read_text())
        except json.JSONDecodeError as err:
            result = {"unreadable_json": str(err)}
    ok = rc == 0 and result is not None
    return {"script": script.name, "command": " ".join(cmd[1:]), "returncode": rc, "ok": ok,
            "wall_s": round(wall, 2), "out": str(out), "result": result,
            "output_tail": text[-2000:]}


def markdown(summary: dict) -> str:
    lines = [f"# Benchmarks ({'quick' if summary['quick'] else 'full'} runs)", "",
             f"Machine: {summary['machine']}. Started {summary['started']}.", "",
             "| script | status | wall s | output |", "|---|---|---|---|"]
    for r in summary["runs"]:
        status = "ok" if r["ok"] else f"FAILED (rc={r['returncode']})"
        lines.append(f"| {r['script']} | {status} | {r['wall_s']:.1f} | {r['out']} |")
    for r in summary["runs"]:
        lines += ["", f"## {r['script']}", "", f"`python {r['command']}`", ""]
        if r["result"] is not None:
            lines += ["```json", json.dumps(r["result"], indent=1, sort_keys=True)[:4000], "```"]
        else:
            lines += ["No JSON result. Output tail:", "", "```", r["output_tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script")
    ap.add_argument("--out", default=str(REPO / "results" / "bench"), help="folder for results and summary")
    ap.add_argument("--bench-dir", default=str(REPO / "bench"))
    ap.add_argument("--only", nargs="*", help="script stems to run (default: all)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per script")
    args = ap.parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import os

    summary = {
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "runs": [],
    }
    for script in discover(pathlib.Path(args.bench_dir), args.only):
        print(f"[run_all] {script.name} ...", flush=True)
        run = run_script(script, out_dir, quick=args.quick, timeout=args.timeout)
        print(f"[run_all] {script.name}: {'ok' if run['ok'] else 'FAILED'} in {run['wall_s']:.1f} s", flush=True)
        summary["runs"].append(run)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    (out_dir / "summary.md").write_text(markdown(summary))
    print(f"[run_all] wrote {out_dir / 'summary.md'}")
    return 0 if all(r["ok"] for r in summary["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
