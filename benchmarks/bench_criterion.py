"""What the solvers reach: F and AM/GM of diag(G) before and after, per solver, with and without
--bn-statistics, and how many groups end on a bound (bounds.py).

    python benchmarks/bench_criterion.py models/                       # every shipped model
    python benchmarks/bench_criterion.py models/ path/to/real/ --json out.json

Each file runs in a fresh subprocess of this interpreter (its time its own; PYTHONPATH picks the
onnx_pathcond under test), with the four settings cd / exact, each with bn_statistics off and on,
through `onnx_pathcond.rescale` with its verification. One Markdown row per file and setting:
F before and after, AM/GM before and after, whether the solver converged (for cd: its sweep rule;
for exact: the KKT conditions within the bounds), the KKT residual, the groups with a bound and
those on it, and the seconds. A model without BatchNorm statistics to carry gets "no BN
statistics" for the bn rows. It checks what the solve promises and marks a row `!` where F after
is above F before, or exact above cd on the same setting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = [("cd", False), ("exact", False), ("cd", True), ("exact", True)]


def _one(path: str) -> list:
    from onnx_pathcond import rescale

    rows = []
    for solver, bn in SETTINGS:
        t0 = time.perf_counter()
        try:
            _, report = rescale(path, solver=solver, bn_statistics=bn, verify_output=True)
        except Exception as e:  # a refusal or a failure is a row, not a crash
            rows.append({"solver": solver, "bn": bn, "error": f"{type(e).__name__}: {str(e)[:160]}"})
            continue
        c, s = report.criterion, report.solver
        carried = report.bn_statistics is not None and report.bn_statistics.carried_groups > 0
        rows.append({"solver": solver, "bn": bn, "carried": carried, "groups": report.groups.rescalable,
                     "F_before": None if c is None else c.F_before, "F_after": None if c is None else c.F_after,
                     "am_gm_before": None if c is None else c.am_gm_before,
                     "am_gm_after": None if c is None else c.am_gm_after, "converged": s.converged,
                     "kkt": s.kkt_residual, "bounded": s.bounded, "on_bound": s.on_bound,
                     "verified": report.verification.passed if report.verification else None,
                     "seconds": time.perf_counter() - t0})
    return rows


def _files(paths) -> list:
    found = []
    for p in paths:
        p = Path(p)
        found += sorted(p.glob("*.onnx")) if p.is_dir() else [p]
    return [str(f) for f in found]


def _fmt(x, spec=".6g"):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", help="ONNX files or folders of them")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per file (default 1800)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args.one)))
        return 0
    results = {}
    for path in _files(args.paths):
        try:
            done = subprocess.run([sys.executable, __file__, "--one", path], capture_output=True, text=True,
                                  timeout=args.timeout, env=dict(os.environ))
            results[path] = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else \
                [{"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}]
        except subprocess.TimeoutExpired:
            results[path] = [{"error": f"timed out after {args.timeout:.0f} s"}]
        print(f"done {os.path.basename(path)}", file=sys.stderr)
    print("| model | solver | bn stats | groups | F before | F after | AM/GM before | AM/GM after | converged | "
          "KKT residual | bounded | on bound | s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for path, rows in results.items():
        name = os.path.basename(path)
        by_setting = {(r.get("solver"), r.get("bn")): r for r in rows}
        for r in rows:
            if "error" in r:
                print(f"| {name} | {r.get('solver', '-')} | {'on' if r.get('bn') else 'off'} | {r['error']} |"
                      + " |" * 9)
                continue
            if r["bn"] and not r["carried"]:
                print(f"| {name} | {r['solver']} | on | no BN statistics: as off |" + " |" * 9)
                continue
            flag = ""
            if r["F_after"] is not None and r["F_after"] > r["F_before"]:
                flag = " !"
            cd = by_setting.get(("cd", r["bn"]))
            if r["solver"] == "exact" and cd and "error" not in cd and cd["F_after"] is not None \
                    and r["F_after"] > cd["F_after"]:
                flag = " !"
            print(f"| {name} | {r['solver']} | {'on' if r['bn'] else 'off'} | {r['groups']} | {_fmt(r['F_before'])} | "
                  f"{_fmt(r['F_after'])}{flag} | {_fmt(r['am_gm_before'], '.4g')} | {_fmt(r['am_gm_after'], '.4g')} | "
                  f"{r['converged']} | {_fmt(r['kkt'], '.2g')} | {r['bounded']} | {r['on_bound']} | "
                  f"{r['seconds']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
