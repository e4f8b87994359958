"""Time diag(G) per statistics backend and device, and check that they agree.

    python benchmarks/bench_stats.py                           # numpy and onnxruntime on the CPU
    python benchmarks/bench_stats.py --device cuda             # adds onnxruntime on CUDA
    python benchmarks/bench_stats.py --models resnet50 --device cuda --repeat 5 --profile

For each model, diag(G) is computed by every executor asked for, in this process:

* `numpy`: the reference executor (`pathnet.numpy_executor`), in float64;
* `numpy32`: the same walk in float32 (what `--precision auto` runs first, docs/design.md §2.6):
  the `nodes` column gives its bound on every entry's relative error, which `max rel diff`
  (against float64) must stay below;
* `ort-cpu`, `ort-cuda`: the path network as one float64 ONNX graph run by onnxruntime on the
  CPU or CUDA execution provider.

Columns: `first s` the first run (for CUDA it includes creating the CUDA context and cuDNN/cuBLAS
handles), `best s` the fastest of `--repeat` further runs; for onnxruntime, the best run split
into `build` (writing the ONNX graph), `session` (onnxruntime's graph optimisation and kernel
set-up), `run` (one `session.run`, weights in and g out included) and `criterion` (handing g
to the criterion). For numpy, `best s` is the walk with a sink that only keeps g, and
`criterion` the criterion's intake of those g (`ProblemBuilder`), timed on its own after the
walk, best of `--repeat`. `nodes` placed per provider (onnxruntime >= 1.24); `max rel diff` the
largest |g − g_numpy| over all entries of a tensor relative to that tensor's largest g.

`--profile` runs the onnxruntime graph once more with onnxruntime's profiler and prints the
op types that took the most time, with the provider that ran them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

DEFAULT_MODELS = ["mlp.onnx", "resnet.dynamo_bn.onnx", "unet.dynamo_bn.onnx", "mobilenet.dynamo_bn.onnx",
                  "mlp_k8", "cifar_fcn", "resnet18", "resnet50"]


def model_path(name: str) -> Path:
    if name.endswith(".onnx") and Path(name).is_file():  # any exported file
        return Path(name)
    shipped = ROOT / "models" / name
    if shipped.exists():
        return shipped
    import make_models

    return make_models.ensure([name])[0]


def collect_g(graph, analysis, backend: str, device: str, native_conv=None, precision: str = "float64"):
    """diag(G) per parameter use (float64 arrays), the statistics' own record, and the time.

    `native_conv` (onnxruntime only) forces the convolution form of the path-network graph;
    None leaves the tool's own choice. `precision` float32: the numpy walk in float32."""
    from onnx_pathcond.pathnet import ort
    from onnx_pathcond.stats import compute_diag_g

    out: Dict[int, np.ndarray] = {}

    def keep(stat):
        use, g = stat.use, stat.array()
        out[use.index] = out[use.index] + g if use.index in out else np.array(g, dtype=np.float64)

    start = time.perf_counter()
    if native_conv is None:
        info = compute_diag_g(graph, analysis, keep, backend=backend, device=device, precision=precision).as_dict()
    else:
        info = ort.compute_diag_g(graph, analysis, keep, device=device, native_conv=native_conv).as_dict()
    return out, info, time.perf_counter() - start


def criterion_intake(analysis, groups, g: Dict[int, np.ndarray]) -> float:
    """Seconds the criterion takes to receive every statistic (its sink, `ProblemBuilder`) and
    make its problem, from the arrays `collect_g` kept: what the numpy walk hands over as it
    goes, timed apart from the walk."""
    from onnx_pathcond.criteria.cells import ProblemBuilder
    from onnx_pathcond.pathnet.records import Statistic

    records = [Statistic(use, g[use.index]) for use in analysis.uses if use.index in g]
    start = time.perf_counter()
    builder = ProblemBuilder(groups, analysis.uses, analysis.shared)
    for record in records:
        builder.add(record)
    builder.finish()
    return time.perf_counter() - start


def max_rel_diff(ref: Dict[int, np.ndarray], got: Dict[int, np.ndarray]) -> float:
    if set(ref) != set(got):
        return float("inf")
    worst = 0.0
    for key, r in ref.items():
        scale = max(float(np.abs(r).max()), 1e-300)
        worst = max(worst, float(np.abs(r - got[key]).max()) / scale)
    return worst


def profile_ops(graph, analysis, device: str, top: int, native_conv=None) -> List[str]:
    """Per op type: total time and the provider(s), from onnxruntime's profiler."""
    import onnxruntime as ort

    from onnx_pathcond.pathnet.ort import build, session_config

    if native_conv is None:
        native_conv = device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    builder = build(graph, analysis, native_conv=native_conv)
    model = builder.model()
    options, providers = session_config(device)  # the tool's own settings, plus the profiler
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "stats")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        names = [o.name for o in session.get_outputs()]
        session.run(names, builder.feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: Dict[tuple, list] = defaultdict(lambda: [0.0, 0])
    total = 0.0
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            key = (args.get("op_name", "?"), args.get("provider", "?"))
            per_op[key][0] += ev.get("dur", 0) / 1e6
            per_op[key][1] += 1
            total += ev.get("dur", 0) / 1e6
    rows = sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]
    lines = [f"    {op:<18} {prov:<24} {n:>6} nodes  {t:8.4f} s  {100 * t / max(total, 1e-12):5.1f} %"
             for (op, prov), (t, n) in rows]
    lines.append(f"    kernels in all: {total:.4f} s")
    return lines


def time_opt_levels(graph, analysis, device: str, native_conv=None) -> List[str]:
    """Session creation and one run of the path-network graph at each graph-optimisation level
    (the graph runs once: optimising it only pays when the run gains more than it costs)."""
    import onnxruntime as ort

    from onnx_pathcond.pathnet.ort import build, session_config

    if native_conv is None:
        native_conv = device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    builder = build(graph, analysis, native_conv=native_conv)
    data = builder.model().SerializeToString()
    names = [n for name, (_, factored) in builder.g_outputs.items()
             for n in ([f"{name}_left", f"{name}_right"] if factored else [name])]
    lines = []
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
        best = None
        for _ in range(2):
            options, providers = session_config(device)
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            t0 = time.perf_counter()
            session = ort.InferenceSession(data, options, providers=providers)
            t1 = time.perf_counter()
            session.run(names, builder.feeds)
            t2 = time.perf_counter()
            if best is None or t2 - t0 < best[0] + best[1]:
                best = (t1 - t0, t2 - t1)
            del session
        lines.append(f"    {level:<20} session {best[0]:7.3f} s  run {best[1]:7.3f} s  sum {sum(best):7.3f} s")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Time diag(G) per backend and device; compare with numpy.")
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                    help="files in models/ (with .onnx) or benchmark model names (make_models.py)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda adds onnxruntime on its CUDA execution provider")
    ap.add_argument("--no-ort-cpu", action="store_true", help="skip onnxruntime on the CPU")
    ap.add_argument("--both-conv-forms", action="store_true",
                    help="with --device cuda, also run the graph with convolutions as matrix products "
                         "(`cuda-mm`; the CUDA default writes them as float64 Conv nodes)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs after the first (best kept)")
    ap.add_argument("--profile", action="store_true", help="per-op times from onnxruntime's profiler")
    ap.add_argument("--top", type=int, default=8, help="op types shown by --profile")
    ap.add_argument("--opt-levels", action="store_true",
                    help="time session creation and run at each onnxruntime graph-optimisation level")
    ap.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    args = ap.parse_args(argv)

    from onnx_pathcond.api import analyse_model, load_model

    executors = [("numpy", "numpy", "cpu", None, "float64"), ("numpy32", "numpy", "cpu", None, "float32")]
    if not args.no_ort_cpu:
        executors.append(("ort-cpu", "onnxruntime", "cpu", None, "float64"))
    if args.device == "cuda":
        executors.append(("ort-cuda", "onnxruntime", "cuda", None, "float64"))
        if args.both_conv_forms:
            executors.append(("cuda-mm", "onnxruntime", "cuda", False, "float64"))
    from onnx_pathcond.stats import PrecisionLost
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, providers available: {', '.join(ort.get_available_providers())}")
    header = (f"{'model':<24} {'executor':<9} {'params':>11} {'first s':>8} {'best s':>8} {'build':>6} "
              f"{'session':>7} {'run':>6} {'crit.':>6} {'max rel diff':>12}  nodes per provider")
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.models:
        path = model_path(name)
        name = path.stem if name.endswith(".onnx") else name
        graph, analysis, groups = analyse_model(load_model(str(path)))
        params = sum(int(np.prod(u.view_shape)) for u in analysis.uses if not u.ignored)
        reference = None
        for label, backend, device, native, precision in executors:
            try:
                g, info, first = collect_g(graph, analysis, backend, device, native, precision)
            except PrecisionLost as lost:
                print(f"{name:<24} {label:<9} outside float32's range: {lost}", flush=True)
                continue
            best, best_info = None, info
            for _ in range(max(args.repeat, 0)):
                del g
                g, info, took = collect_g(graph, analysis, backend, device, native, precision)
                if best is None or took < best:
                    best, best_info = took, info
            if reference is None:
                reference, diff = g, 0.0
            else:
                diff = max_rel_diff(reference, g)
            t = dict(best_info.get("timings", {}))
            if backend == "numpy":  # the walk hands g to the criterion as it goes: timed apart here
                t["criterion"] = min(criterion_intake(analysis, groups, g) for _ in range(max(args.repeat, 1)))
            del g
            placed = best_info.get("nodes_by_provider") or {}
            where = ", ".join(f"{p.replace('ExecutionProvider', '')} {n}" for p, n in placed.items()) or \
                ",".join(best_info.get("providers", []))
            if best_info.get("precision") == "float32":
                where += f" float32, bound {best_info['relative_error_bound']:.1e}"
            if best_info.get("notice"):
                where += f"  [{best_info['notice']}]"
            cells = [f"{name:<24}", f"{label:<9}", f"{params:>11,d}", f"{first:8.3f}",
                     f"{best:8.3f}" if best is not None else f"{'-':>8}"]
            cells += [f"{t[k]:{w}.3f}" if k in t else f"{'-':>{w}}" for k, w in
                      (("build", 6), ("session", 7), ("run", 6), ("criterion", 6))]
            cells += [f"{diff:12.2e}", " " + where]
            print(" ".join(cells), flush=True)
            rows.append({"model": name, "executor": label, "parameters": params, "first_s": first, "best_s": best,
                         "timings": t, "max_rel_diff": diff, "nodes_by_provider": placed,
                         "cpu_fallback_ops": best_info.get("cpu_fallback_ops", {}),
                         "notice": best_info.get("notice", "")})
            if best_info.get("cpu_fallback_ops") and device == "cuda":
                print("    ran on the CPU: " + ", ".join(f"{op} x{n}" for op, n in best_info["cpu_fallback_ops"].items()))
            if args.profile and backend == "onnxruntime":
                for text in profile_ops(graph, analysis, device, args.top, native):
                    print(text)
            if args.opt_levels and backend == "onnxruntime":
                for text in time_opt_levels(graph, analysis, device, native):
                    print(text)
        reference = None
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
