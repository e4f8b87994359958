"""Our vectorised coordinate descent against a plain loop-per-neuron one, and the exact minimiser.

    python benchmarks/bench_solver.py                  # mlp_k3..mlp_k8 and cifar_fcn
    python benchmarks/bench_solver.py --quick          # mlp_k3 and cifar_fcn, short budget
    python benchmarks/bench_solver.py --models resnet18 mlp --budget 60 --json out.json

For each model, diag(G) and the groups come from the tool's own analysis (numpy statistics).
The *plain loop* is the authors' cyclic coordinate descent (docs/design.md §4) written the
straightforward way: for each group h in order, sum its incoming and outgoing entries of the
current rescaled diag(G) (gathered through index lists precomputed per group, as the authors'
code has them from the layer structure), take D_h = total − B_h − C_h, solve
B_h(A_h+p)X² + A_h·D_h·X + C_h(A_h−p) = 0, scale the incoming entries by 1/X and the
outgoing ones by X, and update u_h and the running total. Numpy per neuron, a Python loop
over neurons.

(a) 10 sweeps from u = 0: `onnx_pathcond.criteria.pathcond.coordinate_descent(problem, max_iter=10, tol=0)`
    against the plain loop; times, speed-up, F of each, max |u_ours − u_plain|.
(b) to convergence: both coordinate descents until max_h |∇F_h| < tol · max_h |∇F_h(0)|
    (checked after every sweep, check time excluded; capped at --max-sweeps sweeps or --budget
    seconds), against `onnx_pathcond.solve.exact_minimiser(problem, tol=the same absolute tol)`.
    "ours" to convergence is the tool's own layer-wise sweep (`cells.layers`, `cells.layer_sums`,
    `pathcond._layer_updates`, as `coordinate_descent` calls them) in a loop that can test the gradient;
    its first 10 sweeps are checked against `coordinate_descent`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
DEFAULT_MODELS = [f"mlp_k{k}" for k in range(3, 9)] + ["cifar_fcn"]
QUICK_MODELS = ["mlp_k3", "cifar_fcn"]


# ---------------------------------------------------------------------------- the problem
class Entries:
    """diag(G) one entry per parameter element, organised per group for the plain loop."""

    def __init__(self, g, gin, gout, H):
        keep = g > 0
        g, gin, gout = g[keep], gin[keep], gout[keep]
        self.p = int(g.size)
        self.H = H
        moving = gin != gout  # same group (or none) on both sides: the entry never changes
        self.const = float(g[~moving].sum())
        self.g = np.ascontiguousarray(g[moving])
        gin, gout = gin[moving], gout[moving]
        self.in_idx = self._split(gin, H)
        self.out_idx = self._split(gout, H)
        n_in = np.array([len(i) for i in self.in_idx], dtype=np.float64)
        n_out = np.array([len(i) for i in self.out_idx], dtype=np.float64)
        self.A = n_in - n_out

    @staticmethod
    def _split(group, H) -> List[np.ndarray]:
        sel = np.flatnonzero(group >= 0)
        order = sel[np.argsort(group[sel], kind="stable")]
        counts = np.bincount(group[sel], minlength=H)
        return np.split(order, np.cumsum(counts)[:-1]) if H else []


def build_problem(path: str):
    """(Problem, Entries, seconds for analysis+statistics) with the tool's analysis."""
    import onnx_pathcond
    from onnx_pathcond.api import analyse_model
    from onnx_pathcond.criteria.pathcond import ProblemBuilder
    from onnx_pathcond.stats import compute_diag_g

    t0 = time.perf_counter()
    model = onnx_pathcond.load_model(path)
    graph, analysis, groups = analyse_model(model)
    shared = getattr(analysis, "shared", None)  # name -> (uses, mask of non-zero elements), when the tool has it
    takes_shared = len(inspect.signature(ProblemBuilder).parameters) >= 3
    builder = ProblemBuilder(groups, analysis.uses, shared) if takes_shared else ProblemBuilder(groups, analysis.uses)
    of = groups.of_position
    # A tensor read by several nodes is one set of parameters: sum its g over the uses, as the
    # builder does (its zero elements, when the tool says which, stay each use's own entries).
    expected: Dict[str, int] = {}
    for use in analysis.uses:
        if use.ref is not None and not use.ignored:
            expected[use.ref.name] = expected.get(use.ref.name, 0) + 1
    nonzero = {name: mask for name, (_, mask) in (shared or {}).items()} if takes_shared else {}
    pending: Dict[str, list] = {}
    chunks = []

    def gid(use, pos):
        pos = np.broadcast_to(pos, use.view_shape)
        ids = np.where(pos >= 0, of[np.maximum(pos, 0)] if of.size else -1, -1)
        return ids.ravel()

    def flat(use, g):
        chunks.append((g.ravel().copy(), gid(use, use.rows), gid(use, use.cols)))

    def both(stat):
        builder.add(stat)
        use, g = stat.use, stat.array()
        if use.ref is not None and expected.get(use.ref.name, 1) > 1:
            name = use.ref.name
            mask = nonzero.get(name)
            if mask is not None and not mask.all():
                keep = use.ref.to_view(mask)
                flat(use, np.where(keep, 0.0, g))
                g = np.where(keep, g, 0.0)
            if name in pending:
                pending[name][1] = pending[name][1] + pending[name][0].ref.to_view(use.ref.to_stored(g))
                pending[name][2] += 1
            else:
                pending[name] = [use, g.copy(), 1]
            if pending[name][2] == expected[name]:
                first, acc, _ = pending.pop(name)
                flat(first, acc)
            return
        flat(use, g)

    compute_diag_g(graph, analysis, both, backend="numpy")
    for first, acc, _ in pending.values():
        flat(first, acc)
    problem = builder.finish()
    t_stats = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0)
    gin = np.concatenate([c[1] for c in chunks]).astype(np.int64) if chunks else np.zeros(0, np.int64)
    gout = np.concatenate([c[2] for c in chunks]).astype(np.int64) if chunks else np.zeros(0, np.int64)
    entries = Entries(g, gin, gout, groups.count)
    return problem, entries, t_stats, time.perf_counter() - t0


# ---------------------------------------------------------------------------- the plain loop
def positive_root(A: float, D: float, B: float, C: float, p: float) -> float:
    """Positive root of B(A+p)X² + A·D·X + C(A−p) = 0 (scalar; cancellation-free form)."""
    qa, qb, qc = B * (A + p), A * D, C * (A - p)
    disc = math.sqrt(max(qb * qb - 4.0 * qa * qc, 0.0))
    if qb > 0:
        return -2.0 * qc / (qb + disc)
    return (disc - qb) / (2.0 * qa) if qa != 0 else math.nan


class PlainLoop:
    """The authors' cyclic coordinate descent, one neuron at a time, on the rescaled diag(G)."""

    def __init__(self, entries: Entries):
        self.e = entries
        self.gc = entries.g.copy()  # current rescaled diag(G) of the movable entries
        self.u = np.zeros(entries.H)
        self.A = entries.A.tolist()

    def sweep(self) -> float:
        e, gc, u, A = self.e, self.gc, self.u, self.A
        p = float(e.p)
        total = e.const + float(gc.sum())
        change = 0.0
        for h in range(e.H):
            ii, oo = e.in_idx[h], e.out_idx[h]
            C = float(gc[ii].sum())  # incoming sum
            B = float(gc[oo].sum())  # outgoing sum
            if B <= 0.0 and C <= 0.0:
                continue
            D = total - B - C
            X = positive_root(A[h], D, B, C, p)
            if not (math.isfinite(X) and X > 0.0):
                continue
            gc[ii] /= X
            gc[oo] *= X
            total = D + B * X + C / X
            du = math.log(X)
            u[h] += du
            change += abs(du)
        return change


# ---------------------------------------------------------------------------- ours, with a gradient test
def our_cd_until(problem, tol_abs: float, max_sweeps: int, budget: float, check_at: int = 10):
    """The tool's layer-wise coordinate descent (as in criteria.pathcond.coordinate_descent), gradient-tested."""
    from onnx_pathcond import solve as S
    from onnx_pathcond.criteria import pathcond as P

    t0 = time.perf_counter()
    from onnx_pathcond.criteria import cells
    layers = cells.layers(problem)
    A = problem.A
    p = float(problem.p)
    u_ext = np.zeros(problem.H + 1)
    work = time.perf_counter() - t0
    check_time = 0.0
    sweeps, gmax, u_at = 0, math.inf, None
    while sweeps < max_sweeps and work < budget:
        t0 = time.perf_counter()
        total = problem.total(u_ext[:-1])
        for layer in layers:
            B, C = cells.layer_sums(problem, layer, u_ext)
            sl = slice(layer.start, layer.stop)
            X, total = P._layer_updates(total, B, C, A[sl], np.exp(u_ext[sl]), p)
            u_ext[sl] = np.log(X)
        work += time.perf_counter() - t0
        sweeps += 1
        t0 = time.perf_counter()
        gmax = float(np.abs(problem.gradient(u_ext[:-1])).max())
        check_time += time.perf_counter() - t0
        if sweeps == check_at:
            u_at = u_ext[:-1].copy()
        if gmax < tol_abs:
            break
    return u_ext[:-1].copy(), sweeps, work, check_time, gmax, u_at


def plain_until(entries: Entries, problem, tol_abs: float, max_sweeps: int, budget: float):
    loop = PlainLoop(entries)
    work = check_time = 0.0
    sweeps, gmax = 0, math.inf
    while sweeps < max_sweeps and work < budget:
        t0 = time.perf_counter()
        loop.sweep()
        work += time.perf_counter() - t0
        sweeps += 1
        t0 = time.perf_counter()
        gmax = float(np.abs(problem.gradient(loop.u)).max())
        check_time += time.perf_counter() - t0
        if gmax < tol_abs:
            break
    return loop.u.copy(), sweeps, work, check_time, gmax


# ---------------------------------------------------------------------------- one model
def bench_model(name: str, path: str, args) -> Dict:
    from onnx_pathcond import solve as S
    from onnx_pathcond.criteria import pathcond as P

    out: Dict = {"model": name}
    problem, entries, t_stats, t_index = build_problem(path)
    out.update(groups=problem.H, p=problem.p, stats_s=t_stats, index_s=t_index)
    if entries.p != problem.p or not np.array_equal(entries.A, problem.A):
        out["warning"] = (f"plain-loop entries differ from the tool's Problem: p {entries.p} vs {problem.p}, "
                          f"max |ΔA| {np.abs(entries.A - problem.A).max() if entries.H else 0}")
    if problem.H == 0 or problem.p == 0:
        out["error"] = "no rescalable group"
        return out

    # (a) 10 sweeps
    n = args.sweeps
    best = math.inf
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        ours = P.coordinate_descent(problem, max_iter=n, tol=0.0)
        best = min(best, time.perf_counter() - t0)
    loop = PlainLoop(entries)
    t0 = time.perf_counter()
    for _ in range(n):
        loop.sweep()
    t_plain = time.perf_counter() - t0
    out["a"] = {"sweeps": n, "ours_s": best, "plain_s": t_plain, "speedup": t_plain / best,
                "F0": problem.objective(np.zeros(problem.H)),
                "F_ours": problem.objective(ours.u), "F_plain": problem.objective(loop.u),
                "max_du": float(np.abs(ours.u - loop.u).max()), "ours_sweeps": ours.sweeps}
    print(f"  {name}: (a) done: ours {best:.3f}s, plain {t_plain:.3f}s", flush=True)
    if args.skip_convergence:
        return out

    # (b) to convergence
    g0 = float(np.abs(problem.gradient(np.zeros(problem.H))).max())
    tol_abs = args.tol * g0
    b: Dict = {"tol_rel": args.tol, "grad0": g0, "tol_abs": tol_abs}
    u_o, s_o, w_o, c_o, gm_o, u10 = our_cd_until(problem, tol_abs, args.max_sweeps, args.budget)
    b["ours"] = {"sweeps": s_o, "s": w_o, "check_s": c_o, "F": problem.objective(u_o), "grad": gm_o,
                 "converged": gm_o < tol_abs,
                 "check10": float(np.abs(u10 - ours.u).max()) if u10 is not None and n == 10 else None}
    print(f"  {name}: (b) ours: {s_o} sweeps {w_o:.1f}s", flush=True)
    u_p, s_p, w_p, c_p, gm_p = plain_until(entries, problem, tol_abs, args.max_sweeps, args.budget)
    b["plain"] = {"sweeps": s_p, "s": w_p, "check_s": c_p, "F": problem.objective(u_p), "grad": gm_p,
                  "converged": gm_p < tol_abs}
    print(f"  {name}: (b) plain: {s_p} sweeps {w_p:.1f}s", flush=True)
    t0 = time.perf_counter()
    ex = S.exact_minimiser(problem, max_iter=args.exact_iter, tol=tol_abs)
    t_ex = time.perf_counter() - t0
    gm_e = float(np.abs(problem.gradient(ex.u)).max())
    b["exact"] = {"sweeps": ex.sweeps, "s": t_ex, "check_s": 0.0, "F": problem.objective(ex.u), "grad": gm_e,
                  "converged": gm_e < tol_abs, "max_abs_u": float(np.abs(ex.u).max())}
    b["ours"]["max_abs_u"] = float(np.abs(u_o).max())
    b["plain"]["max_abs_u"] = float(np.abs(u_p).max())
    out["b"] = b
    return out


# ---------------------------------------------------------------------------- printing
def print_a(results: List[Dict]) -> None:
    print("\n(a) fixed number of sweeps from u = 0 (the tool's default method)")
    hdr = (f"{'model':<16} {'groups':>6} {'entries p':>10} {'sweeps':>6} {'ours s':>8} {'plain s':>8} "
           f"{'speed-up':>8} {'F(0)':>16} {'F ours':>16} {'F plain':>16} {'max|du|':>8} {'stats s':>7} {'index s':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if "a" not in r:
            print(f"{r['model']:<16} ERROR: {r.get('error')}")
            continue
        a = r["a"]
        print(f"{r['model']:<16} {r['groups']:>6,d} {r['p']:>10,d} {a['sweeps']:>6d} {a['ours_s']:>8.3f} "
              f"{a['plain_s']:>8.2f} {a['speedup']:>7.1f}x {a['F0']:>16.9e} {a['F_ours']:>16.9e} "
              f"{a['F_plain']:>16.9e} {a['max_du']:>8.1e} {r['stats_s']:>7.2f} {r['index_s']:>7.2f}")


def print_b(results: List[Dict], args) -> None:
    rows = [r for r in results if "b" in r]
    if not rows:
        return
    print(f"\n(b) to convergence: stop when max|∇F| < {args.tol:g} × max|∇F(0)|; coordinate descent capped at "
          f"{args.max_sweeps} sweeps or {args.budget:g} s of sweeping (gradient checks excluded), "
          f"exact at {args.exact_iter} iterations")
    hdr = (f"{'model':<16} {'method':<12} {'sweeps/it':>9} {'time s':>8} {'ms/sweep':>9} {'check s':>7} "
           f"{'F':>16} {'F - F_exact':>11} {'max|∇F|':>9} {'tol':>8} {'max|u|':>7} {'status':<10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        b = r["b"]
        for key, label in (("ours", "ours CD"), ("plain", "plain CD"), ("exact", "exact L-BFGS")):
            m = b[key]
            if m["converged"]:
                status = "converged"
            elif key == "exact":
                status = "iter cap" if m["sweeps"] >= args.exact_iter else "stalled"
            else:
                status = "sweep cap" if m["sweeps"] >= args.max_sweeps else "time cap"
            print(f"{r['model']:<16} {label:<12} {m['sweeps']:>9d} {m['s']:>8.3f} "
                  f"{1e3 * m['s'] / max(m['sweeps'], 1):>9.3f} {m['check_s']:>7.2f} {m['F']:>16.9e} "
                  f"{m['F'] - b['exact']['F']:>11.3e} {m['grad']:>9.2e} {b['tol_abs']:>8.1e} "
                  f"{m['max_abs_u']:>7.2f} {status:<10}")
    checks = [(r["model"], r["b"]["ours"]["check10"]) for r in rows if r["b"]["ours"].get("check10") is not None]
    if checks:
        print("ours-to-convergence loop vs coordinate_descent after 10 sweeps, max|du|: "
              + ", ".join(f"{m} {d:.1e}" for m, d in checks))


# ---------------------------------------------------------------------------- main
def resolve(name: str) -> Path:
    if name.endswith(".onnx") and os.path.exists(name):
        return Path(name).resolve()
    for cand in (CACHE / f"{name}.onnx", ROOT / "models" / f"{name}.onnx"):
        if cand.exists():
            return cand
    sys.path.insert(0, str(HERE))
    import make_models

    if name in make_models.MODELS:
        return make_models.build(name)
    raise SystemExit(f"unknown model '{name}'")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Coordinate descent: ours vs a plain per-neuron loop vs the exact minimiser.")
    ap.add_argument("--models", nargs="+", metavar="NAME", help=f"default: {' '.join(DEFAULT_MODELS)}")
    ap.add_argument("--quick", action="store_true", help=f"{' '.join(QUICK_MODELS)}, budget 5 s, 300 sweeps")
    ap.add_argument("--sweeps", type=int, default=10, help="sweeps for (a) (default 10)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N for our solver in (a)")
    ap.add_argument("--tol", type=float, default=1e-6, help="(b): relative gradient tolerance (default 1e-6)")
    ap.add_argument("--max-sweeps", type=int, default=5000, help="(b): sweep cap for coordinate descent")
    ap.add_argument("--budget", type=float, default=25.0, help="(b): seconds of sweeping per CD run (default 25)")
    ap.add_argument("--exact-iter", type=int, default=1000, help="(b): iteration cap of the exact minimiser")
    ap.add_argument("--skip-convergence", action="store_true", help="only (a)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if args.quick:
        args.budget = min(args.budget, 5.0)
        args.max_sweeps = min(args.max_sweeps, 300)
    names = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs", flush=True)
    results = []
    for name in names:
        try:
            path = resolve(name)
            results.append(bench_model(name, str(path), args))
        except Exception as e:  # noqa: BLE001 -- report and go on
            results.append({"model": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
            print(f"  {name}: ERROR {type(e).__name__}: {e}", flush=True)
    print_a(results)
    print_b(results, args)
    for r in results:
        if r.get("warning"):
            print(f"warning: {r['model']}: {r['warning']}")
        if r.get("traceback"):
            print(f"\n--- {r['model']} crashed:\n{r['traceback']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
