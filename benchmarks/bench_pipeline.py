"""Time every step of `onnx_pathcond.rescale` on a table of models, with peak memory.

    python benchmarks/bench_pipeline.py                      # models/*.onnx + benchmark models
    python benchmarks/bench_pipeline.py --quick              # the same without resnet50 and vgg16
    python benchmarks/bench_pipeline.py --models mlp_k8 resnet18 --json out.json

One row per model and per statistics backend (numpy and onnxruntime when `rescale` takes a
`backend` argument; numpy only otherwise). Each run happens in a fresh subprocess
(`bench_pipeline.py --child ...`), so the peak RSS (`ru_maxrss` of the child) belongs to that
run alone. Columns:

* params, groups: parameters of the model, rescalable groups (the report's figures);
* load … verify: `report.timings` (seconds); save: `onnx_pathcond.save_model`; total: their sum;
* peak: peak RSS of the child (MB), which includes the interpreter and its libraries;
  libs: the child's RSS once python, numpy, onnx, onnxruntime and onnx_pathcond are
  imported, before any model is read (the same for every model); file: the model's size
  (external data included); all in MiB; peak/file: their ratio; work/file: (peak − libs) / file,
  the memory that the model costs; base/file: the baseline child's peak / file;
* base: the baseline, timed the same way in its own child: `onnx.load` + `onnx.save` + one
  onnxruntime CPU inference (session creation included) on a random input;
* --repeat N runs every child N times and keeps the fastest (timings on a shared machine are
  noisy: small models' steps are milliseconds);
* wall×: whole child wall time (interpreter start, imports, work) / the baseline child's;
  work×: in-process work (total) / the baseline's in-process work.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
STEPS = ("load", "analyse", "statistics", "solve", "rewrite", "verify", "save")
GENERATED = [f"mlp_k{k}" for k in range(3, 9)] + ["cifar_fcn", "resnet18", "resnet50", "vgg16"]
BIG = ("resnet50", "vgg16")  # left out by --quick


# ---------------------------------------------------------------------------- children
def child_run(path: str, backend: Optional[str], device: Optional[str], solver: str, out: str,
              separate_save: bool = False) -> None:
    """One tool run: rescale + save, timings and peak RSS written as JSON to `out`.

    When `rescale` takes `output=` (it then saves, and verifies the written file), the save is
    part of the run and `report.timings["save"]` times it; otherwise (or with `separate_save`)
    `onnx_pathcond.save_model` is called after it and timed here.
    """
    import resource

    t_start = time.perf_counter()
    result: Dict = {"ok": False}
    try:
        import onnxruntime  # noqa: F401 -- imported before the RSS of the libraries is taken

        import onnx_pathcond

        result["libs_rss_mb"] = _current_rss_mb()
        kwargs = {"verify_output": True, "solver": solver}
        if backend is not None:
            kwargs["backend"] = backend
        if device is not None:
            kwargs["device"] = device
        t_import = time.perf_counter() - t_start
        inline = "output" in inspect.signature(onnx_pathcond.rescale).parameters and not separate_save
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            target = os.path.join(tmp, "out.onnx")
            if inline and hasattr(onnx_pathcond, "rescale_file"):  # what the command line runs
                report = onnx_pathcond.rescale_file(path, target, **kwargs)
                timings = dict(report.timings)
            elif inline:  # an older checkout: the same path through rescale's return_model=False
                if "return_model" in inspect.signature(onnx_pathcond.rescale).parameters:
                    kwargs["return_model"] = False
                model, report = onnx_pathcond.rescale(path, output=target, **kwargs)
                timings = dict(report.timings)
            else:
                model, report = onnx_pathcond.rescale(path, **kwargs)
                timings = dict(report.timings)
                t0 = time.perf_counter()
                onnx_pathcond.save_model(model, target)
                timings["save"] = timings.get("save", 0.0) + time.perf_counter() - t0
            if not os.path.exists(target):
                raise RuntimeError("no output file was written")
        d = report.to_dict() if hasattr(report, "to_dict") else {}
        result.update(ok=True, import_s=t_import, timings=timings, save_mode="rescale(output=)" if inline else "save_model",
                      parameters=(d.get("model") or {}).get("parameters"),
                      groups=(d.get("groups") or {}).get("rescalable"), frozen=(d.get("groups") or {}).get("frozen"),
                      statistics=d.get("statistics"),
                      solver={k: d.get("solver", {}).get(k) for k in ("method", "sweeps", "F_before", "F_after")},
                      am_gm=[d.get("criterion", {}).get("am_gm_before"), d.get("criterion", {}).get("am_gm_after")],
                      max_rel=(d.get("verification") or {}).get("max_rel"),
                      warnings=list(getattr(report, "warnings", []) or []))
    except BaseException as e:  # noqa: BLE001 -- reported in the table
        result.update(error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", traceback=traceback.format_exc())
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result["child_s"] = time.perf_counter() - t_start
    Path(out).write_text(json.dumps(result, default=str))


def _current_rss_mb() -> Optional[float]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux
        return None


def child_baseline(path: str, out: str) -> None:
    """onnx.load + onnx.save + one onnxruntime CPU inference (session creation included)."""
    import resource

    t_start = time.perf_counter()
    result: Dict = {"ok": False}
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort

        t_import = time.perf_counter() - t_start
        t0 = time.perf_counter()
        model = onnx.load(path)
        t_load = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            t0 = time.perf_counter()
            onnx.save(model, os.path.join(tmp, "out.onnx"))
            t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {}
        for i in sess.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64,
                     "tensor(float16)": np.float16}.get(i.type, np.float32)
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
        sess.run(None, feeds)
        t_infer = time.perf_counter() - t0
        result.update(ok=True, import_s=t_import, timings={"load": t_load, "save": t_save, "infer": t_infer})
    except BaseException as e:  # noqa: BLE001
        result.update(error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", traceback=traceback.format_exc())
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    result["child_s"] = time.perf_counter() - t_start
    Path(out).write_text(json.dumps(result))


def spawn(args: List[str], timeout: float) -> Dict:
    """Run this script as a child; its JSON result plus the wall time seen from here."""
    with tempfile.NamedTemporaryFile(suffix=".json", dir=CACHE, delete=False) as f:
        out = f.name
    try:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *args, "--out", out],
                                  cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timeout after {timeout:.0f}s", "wall_s": time.perf_counter() - t0}
        wall = time.perf_counter() - t0
        try:
            result = json.loads(Path(out).read_text())
        except (OSError, ValueError):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            result = {"ok": False, "error": f"child exited {proc.returncode}: {tail[0][:300]}",
                      "traceback": proc.stderr}
        result["wall_s"] = wall
        return result
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass


def best_of(args: List[str], timeout: float, repeat: int) -> Dict:
    """The fastest of `repeat` child runs (by the sum of its in-process step times)."""
    best = None
    for _ in range(max(repeat, 1)):
        r = spawn(args, timeout)
        if not r.get("ok"):
            return r
        if best is None or sum(r["timings"].values()) < sum(best["timings"].values()):
            best = r
    best["repeat"] = max(repeat, 1)
    return best


# ---------------------------------------------------------------------------- table
def available_models(quick: bool) -> Dict[str, Path]:
    table: Dict[str, Path] = {}
    for p in sorted((ROOT / "models").glob("*.onnx")):
        table[p.name[:-len(".onnx")]] = p
    for name in GENERATED:
        if quick and name in BIG:
            continue
        table[name] = CACHE / f"{name}.onnx"
    return table


def backends_offered() -> List[Optional[str]]:
    import onnx_pathcond

    params = inspect.signature(onnx_pathcond.rescale).parameters
    return ["numpy", "onnxruntime"] if "backend" in params else [None]


def fmt_s(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_int(x) -> str:
    return "-" if x is None else f"{int(x):,d}"


COLUMNS = [("model", 28, "<"), ("backend", 11, "<"), ("params", 11, ">"), ("groups", 6, ">"),
           *[({"statistics": "stats"}.get(s, s), 7, ">") for s in STEPS], ("total", 7, ">"), ("peak MB", 8, ">"), ("libs MB", 7, ">"),
           ("file MB", 7, ">"), ("peak/file", 9, ">"), ("work/file", 9, ">"), ("base/file", 9, ">"), ("base s", 7, ">"),
           ("wall×", 6, ">"), ("work×", 6, ">")]


def line(cells) -> str:
    return " ".join(f"{str(c):{a}{w}}" for c, (_, w, a) in zip(cells, COLUMNS))


def row_cells(name, backend, r, base) -> List[str]:
    file_mb = r.get("file_mb") or 0.0
    if not r.get("ok"):
        return [name, backend or "-", "ERROR: " + r.get("error", "?")]
    t = r["timings"]
    total = sum(t.get(s, 0.0) for s in STEPS)
    peak = r["peak_rss_mb"]
    libs = r.get("libs_rss_mb")
    base_ok = base is not None and base.get("ok")
    base_work = sum(base["timings"].values()) if base_ok else None
    return [name, backend or "numpy", fmt_int(r.get("parameters")), fmt_int(r.get("groups")),
            *[fmt_s(t.get(s)) for s in STEPS], fmt_s(total), f"{peak:.0f}",
            f"{libs:.0f}" if libs else "-", f"{file_mb:.2f}",
            f"{peak / file_mb:.1f}" if file_mb else "-",
            f"{(peak - libs) / file_mb:.1f}" if file_mb and libs else "-",
            f"{base['peak_rss_mb'] / file_mb:.1f}" if file_mb and base_ok else "-",
            fmt_s(base_work) if base_ok else "err",
            f"{r['wall_s'] / base['wall_s']:.2f}" if base_ok else "-",
            f"{total / base_work:.1f}" if base_ok and base_work else "-"]


def print_row(cells) -> None:
    if len(cells) == 3 and cells[2].startswith("ERROR"):
        print(f"{cells[0]:<28} {cells[1]:<11} {cells[2]}", flush=True)
    else:
        print(line(cells), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Time each step of onnx_pathcond.rescale per model.")
    ap.add_argument("--models", nargs="+", metavar="NAME",
                    help="model names (file stems in models/ or generated names) or .onnx paths")
    ap.add_argument("--quick", action="store_true", help="skip resnet50 and vgg16")
    ap.add_argument("--backends", nargs="+", choices=["numpy", "onnxruntime", "auto"],
                    help="statistics backends (default: numpy and onnxruntime when the API has `backend`)")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="passed to rescale(device=...) when it exists")
    ap.add_argument("--solver", default="cd", choices=["cd", "exact"])
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per child run")
    ap.add_argument("--separate-save", action="store_true",
                    help="call save_model after rescale even when rescale takes output= (default: output=)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each child N times and keep the fastest (by in-process work); default 1")
    ap.add_argument("--json", metavar="FILE", help="write all rows as JSON")
    # child mode (internal)
    ap.add_argument("--child", choices=["run", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child == "run":
        child_run(args.path, args.backend or None, args.device, args.solver, args.out, args.separate_save)
        return 0
    if args.child == "baseline":
        child_baseline(args.path, args.out)
        return 0

    CACHE.mkdir(parents=True, exist_ok=True)
    table = available_models(args.quick)
    if args.models:
        chosen = {}
        for m in args.models:
            if m.endswith(".onnx") and os.path.exists(m):
                chosen[Path(m).name[:-5]] = Path(m).resolve()
            elif m in table or m in GENERATED:
                chosen[m] = table.get(m, CACHE / f"{m}.onnx")
            else:
                ap.error(f"unknown model '{m}' (known: {', '.join(table)})")
        table = chosen
    missing = [n for n, p in table.items() if not p.exists() and n in GENERATED]
    if missing:
        sys.path.insert(0, str(HERE))
        import make_models

        print(f"building {', '.join(missing)} ...", flush=True)
        make_models.ensure(missing)

    import onnx_pathcond

    params = inspect.signature(onnx_pathcond.rescale).parameters
    if args.backends:
        backends = args.backends if "backend" in params else [None]
    else:
        backends = backends_offered()
    device = args.device if "device" in params else None
    save = ("save_model() after rescale" if args.separate_save or "output" not in params
            else "rescale(output=...): save timed by the report, verify reads the written file")
    print(f"onnx_pathcond.rescale(verify_output=True, solver={args.solver!r}"
          f"{', device=' + repr(device) if device else ''}); backends: {', '.join(b or 'numpy (no backend arg)' for b in backends)}; {save}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; times in seconds; each run in a fresh subprocess\n")
    header = [c[0] for c in COLUMNS]
    print(line(header))
    print(line(["-" * w for _, w, _ in COLUMNS]))
    rows = []
    errors = []
    for name, path in table.items():
        # MiB, like ru_maxrss / 1024; a data file next to the model counts too
        file_mb = sum(p.stat().st_size for p in (path, Path(str(path) + ".data")) if p.exists()) / 2**20 \
            if path.exists() else None
        base = best_of(["baseline", "--path", str(path)], args.timeout, args.repeat)
        for backend in backends:
            cmd = ["run", "--path", str(path), "--solver", args.solver]
            if args.separate_save:
                cmd.append("--separate-save")
            if backend:
                cmd += ["--backend", backend]
            if device:
                cmd += ["--device", device]
            r = best_of(cmd, args.timeout, args.repeat)
            r["file_mb"] = file_mb
            print_row(row_cells(name, backend, r, base))
            rows.append({"model": name, "path": str(path), "backend": backend or "numpy", "file_mb": file_mb,
                         "run": r, "baseline": base})
            if not r.get("ok"):
                errors.append((name, backend, r, cmd))
        if not base.get("ok"):
            errors.append((name, "baseline", base, ["baseline", "--path", str(path)]))
    if errors:
        print("\nerrors (identical tracebacks printed once):")
        by_trace: Dict[str, list] = {}
        for name, backend, r, cmd in errors:
            by_trace.setdefault(r.get("traceback") or r.get("error", "?"), []).append((name, backend, r, cmd))
        for trace, runs in by_trace.items():
            print(f"--- {runs[0][2].get('error')}")
            print(f"    in {len(runs)} run(s): " + ", ".join(f"{n} [{b}]" for n, b, _, _ in runs))
            print(f"    reproduce: python benchmarks/bench_pipeline.py --child {' '.join(runs[0][3])} --out /tmp/r.json")
            if runs[0][2].get("traceback"):
                print("    " + trace.rstrip().replace("\n", "\n    "))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "solver": args.solver, "rows": rows}, indent=1, default=str))
        print(f"\nwrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
