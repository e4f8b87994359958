"""Scale checks: the exact solver on 10⁵ groups / 10⁸ parameters, and a model over 2 GB.

    python benchmarks/bench_large.py            # both (about 5 minutes, 10 GB of memory, 5 GB of disk)
    python benchmarks/bench_large.py --only solver
    python benchmarks/bench_large.py --only external
    python benchmarks/bench_large.py --only external --keep --tools /path/to/base /path/to/new --repeat 2

* `solver`: an MLP of 101 layers of width 1000 (10⁵ hidden neurons, 10⁸ weights), built with
  onnx.helper, its weights in external data. Runs the statistics once, then the exact solver
  (L-BFGS) to max|∇F| < tol, and the default 10-sweep coordinate descent, and prints
  iterations, time, F, the gradient norm and max |u|.
* `external`: an MLP whose weights take 2.15 GB (more than protobuf's 2 GB limit for one
  file), saved with external data. Runs the command line on it in a subprocess, prints the
  time of each step and the peak memory, and checks that the output keeps its weights
  external and that onnxruntime gives the same outputs for both files.

Generated files go to benchmarks/.cache/large/ and are removed afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "large")


def build_mlp(path: str, widths, seed: int = 0) -> int:
    """A ReLU MLP (Gemm layers, transB=1) saved with external data; returns its parameter count."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    count = 0
    for k, (fin, fout) in enumerate(zip(widths[:-1], widths[1:])):
        w = (rng.standard_normal((fout, fin), dtype=np.float32) * np.float32(np.sqrt(2.0 / fin)))
        b = (rng.standard_normal(fout, dtype=np.float32) * np.float32(0.01))
        inits += [numpy_helper.from_array(w, f"fc{k}.weight"), numpy_helper.from_array(b, f"fc{k}.bias")]
        count += w.size + b.size
        y = f"h{k}"
        nodes.append(helper.make_node("Gemm", [x, f"fc{k}.weight", f"fc{k}.bias"], [y], transB=1, name=f"fc{k}"))
        x = y
        if k < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{k}"], name=f"relu{k}"))
            x = f"r{k}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, widths[0]])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, widths[-1]])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if os.path.exists(path + ".data"):
        os.remove(path + ".data")  # onnx.save appends to an existing data file
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=os.path.basename(path) + ".data", size_threshold=1024)
    return count


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_solver(keep: bool) -> None:
    from onnx_pathcond.api import analyse_model, load_model
    from onnx_pathcond.criteria.pathcond import ProblemBuilder
    from onnx_pathcond.criteria.pathcond import coordinate_descent
    from onnx_pathcond.solve import exact_minimiser
    from onnx_pathcond.stats import compute_diag_g

    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, "mlp_1000x101.onnx")
    t0 = time.perf_counter()
    params = build_mlp(path, [1000] * 101 + [10])
    print(f"built {path}: {params:,} parameters in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    model = load_model(path)
    graph, analysis, groups = analyse_model(model)
    builder = ProblemBuilder(groups, analysis.uses, analysis.shared)
    compute_diag_g(graph, analysis, builder.add)
    problem = builder.finish()
    print(f"groups {groups.count:,}, entries {problem.p:,}; load+analyse+statistics {time.perf_counter() - t0:.1f} s")
    rows = []
    for name, run in [("coordinate descent, 10 sweeps", lambda: coordinate_descent(problem, 10, 1e-2)),
                      ("exact (L-BFGS), tol 1e-6", lambda: exact_minimiser(problem, max_iter=2000, tol=1e-6))]:
        t0 = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - t0
        grad = float(np.abs(problem.gradient(result.u)).max())
        rows.append((name, result.sweeps, seconds, result.objective_before, result.objective_after, grad,
                     float(np.abs(result.u).max()), result.converged))
    print(f"{'method':<32} {'iters':>6} {'time s':>8} {'F before':>16} {'F after':>16} {'max|grad F|':>12} "
          f"{'max|u|':>7} converged")
    for r in rows:
        print(f"{r[0]:<32} {r[1]:>6} {r[2]:>8.2f} {r[3]:>16.9e} {r[4]:>16.9e} {r[5]:>12.3e} {r[6]:>7.2f} {r[7]}")
    print(f"peak memory {peak_rss_mb():.0f} MB (the weights take {params * 4 / 2**20:.0f} MB)")
    if not keep:
        os.remove(path)
        os.remove(path + ".data")


def bench_external(keep: bool, tools=None, repeat: int = 1) -> None:
    """The command line on a 2 GiB MLP. `tools`: checkouts (folders holding onnx_pathcond) to
    run it with, each through PYTHONPATH, alternated `repeat` times (side by side on one
    machine); None: the onnx_pathcond this interpreter imports. The model is kept (and
    reused by the next run) with `keep`."""
    os.makedirs(CACHE, exist_ok=True)
    src = os.path.join(CACHE, "mlp_2gb.onnx")
    out = os.path.join(CACHE, "mlp_2gb.rescaled.onnx")
    report_path = os.path.join(CACHE, "mlp_2gb.report.json")
    t0 = time.perf_counter()
    if keep and os.path.exists(src) and os.path.exists(src + ".data"):
        params = sum(int(np.prod(t.dims)) for t in onnx.load(src, load_external_data=False).graph.initializer)
        how = "reused"
    else:
        params = build_mlp(src, [8192] * 9 + [10], seed=1)
        how = "built"
    size = os.path.getsize(src) + os.path.getsize(src + ".data")
    print(f"{how} {src}: {params:,} parameters, {size / 2**30:.2f} GiB on disk, in {time.perf_counter() - t0:.1f} s")
    command = [sys.executable, "-c",
               # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak (it is
               # kept across fork and exec), and this process has just built a 2 GB model
               "import sys; sys.argv = ['onnx-pathcond'] + sys.argv[1:];"
               "from onnx_pathcond.cli import main\n"
               "try:\n    main()\nfinally:\n"
               "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
               "    print('peak_rss_mb', int(hwm) / 1024, file=sys.stderr)",
               src, out, "--report", report_path, "-q"]
    runs = [(tool, k) for k in range(max(repeat, 1)) for tool in (tools or [None])]
    results = []
    for tool, k in runs:
        env = dict(os.environ)
        if tool is not None:
            env["PYTHONPATH"] = os.path.abspath(tool)
        t0 = time.perf_counter()
        # from the cache folder: `python -c` puts the working directory first on sys.path
        run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=CACHE)
        wall = time.perf_counter() - t0
        label = tool or "this interpreter's onnx_pathcond"
        print(f"[{label}, run {k + 1}] exit code {run.returncode}, wall {wall:.1f} s = {size / 1e6 / wall:.0f} MB/s")
        if run.returncode != 0:
            print(run.stderr)
            continue
        peak = float([line for line in run.stderr.splitlines() if line.startswith("peak_rss_mb")][0].split()[1])
        report = json.load(open(report_path))
        print("  steps:", "  ".join(f"{k} {v:.2f}s" for k, v in report["timings"].items()))
        print(f"  peak memory {peak:.0f} MB for a {size / 2**20:.0f} MB model ({peak * 2**20 / size:.2f}x)")
        print(f"  verification: {report['verification']['engine']}, max relative difference "
              f"{report['verification']['max_rel']:.2e}")
        written = onnx.load(out, load_external_data=False)
        big = [t for t in written.graph.initializer if np.prod(t.dims) > 1024]
        print(f"  output: {os.path.getsize(out) / 2**20:.2f} MB model file + "
              f"{os.path.getsize(out + '.data') / 2**30:.2f} GiB data file; "
              f"{sum(t.data_location == TensorProto.EXTERNAL for t in big)}/{len(big)} large tensors external")
        results.append((label, wall, peak, report["timings"]))
    if len(results) > 1:
        print(f"\n{'tool':<40} {'wall s':>7} {'MB/s':>6} {'peak/file':>9}  steps (s)")
        for label, wall, peak, timings in results:
            print(f"{label[-40:]:<40} {wall:>7.1f} {size / 1e6 / wall:>6.0f} {peak * 2**20 / size:>9.2f}  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    for f in ([] if keep else [src, src + ".data"]) + [out, out + ".data", report_path]:
        if os.path.exists(f):
            os.remove(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["solver", "external"])
    parser.add_argument("--keep", action="store_true",
                        help="keep the generated models (and, for external, reuse the kept one)")
    parser.add_argument("--tools", nargs="+", metavar="DIR",
                        help="external: checkouts to run, each through PYTHONPATH, alternated (A/B)")
    parser.add_argument("--repeat", type=int, default=1, help="external: runs per checkout (default 1)")
    args = parser.parse_args()
    if args.only in (None, "solver"):
        bench_solver(args.keep)
    if args.only in (None, "external"):
        bench_external(args.keep, args.tools, args.repeat)


if __name__ == "__main__":
    main()
