"""Seconds of the analysis (`RescalingPlan(ModelFile.read(path, lazy=True))`) per ONNX file.

    python benchmarks/bench_analysis.py FILE_OR_FOLDER... [--repeat 3]
    # before/after, side by side: one column per checkout (its folder goes first on PYTHONPATH)
    python benchmarks/bench_analysis.py /path/real models --checkout /tmp/base --checkout .

Each file is measured in `--runs` fresh subprocesses per checkout, alternated run by run, and
the median is shown (the package's import and the file's reading are outside the timed span).
The first analysis of a process is what the command line pays (lazy imports such as onnx's
reference evaluator included): that is the number shown; `--repeat` runs in the same process
give the best warm time, shown after a slash.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time
import onnx_pathcond
from onnx_pathcond.modelfile import ModelFile
from onnx_pathcond.plan import RescalingPlan
path, repeat = sys.argv[1], int(sys.argv[2])
times = []
for _ in range(repeat):
    mf = ModelFile.read(path, lazy=True)
    t = time.perf_counter()
    plan = RescalingPlan(mf)
    times.append(time.perf_counter() - t)
print(json.dumps({"s": times[0], "best": min(times), "groups": int(plan.groups.count), "module": onnx_pathcond.__file__}))
"""


def _files(args):
    out = []
    for a in args:
        p = Path(a)
        out += sorted(p.glob("*.onnx")) if p.is_dir() else [p]
    return out


def _measure(path, checkout, repeat):
    env = dict(os.environ)
    if checkout:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(checkout).resolve())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    # run from the temporary folder: `-c` puts the working directory first on the path, which
    # would import the checkout the command was started from whatever PYTHONPATH says
    r = subprocess.run([sys.executable, "-c", _CHILD, str(Path(path).resolve()), str(repeat)], env=env,
                       capture_output=True, text=True, cwd=tempfile.gettempdir())
    if r.returncode:
        return {"s": None, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if checkout and not Path(out["module"]).resolve().is_relative_to(Path(checkout).resolve()):
        raise SystemExit(f"{checkout}: imported onnx_pathcond from {out['module']} instead")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--checkout", action="append", default=[],
                    help="a checkout to measure (put first on PYTHONPATH); repeat for side by side")
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per file and checkout (median shown)")
    ap.add_argument("--repeat", type=int, default=3, help="analyses per process (the first is shown, then the best)")
    args = ap.parse_args(argv)
    checkouts = args.checkout or [None]
    names = [c or "s" for c in checkouts]
    rows = []
    for f in _files(args.paths):
        runs = [[] for _ in checkouts]
        for _ in range(args.runs):  # alternated: checkout 1, 2, 1, 2, ...
            for i, c in enumerate(checkouts):
                runs[i].append(_measure(f, c, args.repeat))
        row = []
        for rs in runs:
            ok = [r for r in rs if r.get("s") is not None]
            if len(ok) < len(rs):
                row.append(next(r for r in rs if r.get("s") is None))
                continue
            row.append({"s": statistics.median(r["s"] for r in ok), "best": min(r["best"] for r in ok),
                        "groups": ok[0]["groups"]})
        rows.append((f.name, row))
        cells = [f"{r['s']:.3f}/{r['best']:.3f}" if r.get("s") is not None else "error" for r in row]
        groups = {r.get("groups") for r in row}
        note = "" if len(groups) == 1 else "  groups differ: " + " / ".join(str(r.get("groups")) for r in row)
        ratio = ""
        if len(row) == 2 and all(r.get("s") for r in row):
            ratio = f"  x{row[0]['s'] / row[1]['s']:.2f}"
        print(f"{f.name:40s} " + " ".join(f"{c:>14s}" for c in cells) + ratio + note, flush=True)
    if len(checkouts) > 1:
        print("columns: " + " | ".join(names))
        for i, n in enumerate(names):
            print(f"  total {n}: {sum(r[i]['s'] or 0 for _, r in rows):.3f} s")


if __name__ == "__main__":
    main()
