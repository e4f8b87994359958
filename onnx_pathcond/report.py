"""The report: what was found, what was done, how well it worked — as JSON and as text."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .exporters import folded_batchnorm, folded_batchnorm_warning
from .graph import Graph
from .nodes import node_label
from .pathnet.records import RuntimeInfo
from .records import (BatchNormStatistics, CriterionSummary, ExporterFindings, FrozenRange, GroupCounts, LayerGroups, ModelSummary, RewrittenTensor, SolverSummary, VerificationSummary)
from .symmetry import Analysis, Groups
from .verify import Verification

# Largest finite value of the dtypes a rescaled weight may come near.
_DTYPE_LIMITS = {"float16": 65504.0, "bfloat16": 3.3e38, "float32": 3.4e38}


# The solver's method when there was nothing to solve.
SKIPPED = "skipped, no rescalable group"


def channel_ranges(channels: np.ndarray) -> str:
    """'0-15,32,40-47' for a sorted array of channel indices."""
    if channels.size == 0:
        return ""
    channels = np.unique(channels)
    breaks = np.flatnonzero(np.diff(channels) != 1)
    starts = np.r_[channels[0], channels[breaks + 1]]
    ends = np.r_[channels[breaks], channels[-1]]
    return ",".join(str(s) if s == e else f"{s}-{e}" for s, e in zip(starts.tolist(), ends.tolist()))


def _origins(an: Analysis, positions: np.ndarray):
    """(block index, channel) of each position."""
    starts = np.array([b.start for b in an.blocks], dtype=np.int64)
    k = np.searchsorted(starts, positions, side="right") - 1
    return k, positions - starts[k]


def group_layers(graph: Graph, an: Analysis, groups: Groups, u: Optional[np.ndarray]) -> List[LayerGroups]:
    """One row per node that created rescalable groups: counts and λ = exp(u/2) summary."""
    rows = []
    if groups.count == 0:
        return rows
    layer_of = groups.layer_of
    starts = np.flatnonzero(np.r_[True, layer_of[1:] != layer_of[:-1]])
    stops = np.r_[starts[1:], groups.count]
    k, _ = _origins(an, groups.first_position)
    for s, e in zip(starts.tolist(), stops.tolist()):
        node = graph.nodes[int(layer_of[s])]
        block = an.blocks[int(k[s])]
        row = LayerGroups(node=node_label(node), op_type=node.op_type, tensor=block.tensor, groups=e - s,
                          positions=int(groups.size[s:e].sum()))
        if u is not None:
            lam = np.exp(u[s:e] / 2.0)
            row.lambda_min, row.lambda_median, row.lambda_max = (float(lam.min()), float(np.median(lam)),
                                                                 float(lam.max()))
        rows.append(row)
    return rows


def frozen_summary(graph: Graph, an: Analysis, groups: Groups) -> List[FrozenRange]:
    """Frozen groups, gathered by the tensor they start in and the reason, in the order of
    their first group."""
    roots = groups.frozen_roots
    if roots.size == 0:
        return []
    k, channel = _origins(an, roots)
    key = k * len(groups.reasons) + groups.frozen_reason
    # the rows in the order of their first root (roots are sorted)
    keys, first, row_of = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    by_row = np.argsort(np.argsort(order)[row_of], kind="stable")
    bounds = np.cumsum(np.bincount(row_of, minlength=keys.size)[order])[:-1]
    rows = []
    for j, chans in zip(order.tolist(), np.split(channel[by_row], bounds)):
        block = an.blocks[int(keys[j] // len(groups.reasons))]
        category, reason = groups.reasons[int(keys[j] % len(groups.reasons))]
        rows.append(FrozenRange(node=node_label(graph.nodes[block.node_index]), tensor=block.tensor,
                                channels=channel_ranges(chans), groups=int(chans.size), category=category,
                                reason=reason))
    return rows


@dataclass
class Report:
    """What a run found and did, one typed record per step (see `records`).

    `to_dict()` / `to_json()` give the JSON report; `summary()` the text the command line
    prints. `statistics` holds the statistics step's own record of how it ran (`RuntimeInfo`).
    """

    input: Optional[str] = None
    output: Optional[str] = None
    factors: Optional[str] = None  # the .npz of element-wise factors, when one was written
    model: Optional[ModelSummary] = None
    groups: Optional[GroupCounts] = None
    layers: List[LayerGroups] = field(default_factory=list)
    frozen: List[FrozenRange] = field(default_factory=list)
    barrier_ops: Dict[str, int] = field(default_factory=dict)
    exporter: Optional[ExporterFindings] = None
    bn_statistics: Optional[BatchNormStatistics] = None
    statistics: Optional[RuntimeInfo] = None
    statistics_skipped: Optional[str] = None  # why the statistics step did not run (the enorm criterion)
    criterion: Optional[CriterionSummary] = None
    solver: Optional[SolverSummary] = None
    rewritten: List[RewrittenTensor] = field(default_factory=list)
    verification: Optional[VerificationSummary] = None
    warnings: List[str] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        def record(value, absent):
            return value.as_dict() if value is not None else absent

        return _jsonable({
            "input": self.input, "output": self.output, "factors": self.factors, "model": record(self.model, {}),
            "groups": record(self.groups, {}), "layers": [row.as_dict() for row in self.layers],
            "frozen": [row.as_dict() for row in self.frozen], "barrier_ops": dict(self.barrier_ops),
            "exporter": record(self.exporter, {}), "bn_statistics": record(self.bn_statistics, {}),
            "statistics": record(self.statistics,
                                 {"skipped": self.statistics_skipped} if self.statistics_skipped else {}),
            "criterion": record(self.criterion, {}), "solver": record(self.solver, {}),
            "rewritten": [r.as_dict() for r in self.rewritten], "verification": record(self.verification, None),
            "warnings": list(self.warnings), "timings": dict(self.timings)})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # ---------------------------------------------------------------- filled by the steps
    def describe_analysis(self, graph: Graph, an: Analysis, groups: Groups, external_tensors: int) -> None:
        """The model, its groups (rescalable and frozen, by layer) and what the exporter did."""
        stored = {u.ref.name for u in an.uses if not u.ignored and u.ref is not None}
        shapes = [graph.shape(name) for name in stored]
        self.model = ModelSummary(
            external_data_tensors=external_tensors, nodes=len(graph.nodes), parameter_tensors=len(stored),
            parameters=sum(int(np.prod(shape)) for shape in shapes if shape),
            opsets={o.domain or "ai.onnx": o.version for o in graph.model.opset_import},
            producer=f"{graph.model.producer_name} {graph.model.producer_version}".strip(),
            inputs={k: list(v) for k, v in graph.input_shapes.items()})
        self.frozen = frozen_summary(graph, an, groups)
        by_category: Dict[str, int] = {}
        for row in self.frozen:
            by_category[row.category] = by_category.get(row.category, 0) + row.groups
        self.groups = GroupCounts(rescalable=groups.count, frozen=int(groups.frozen_roots.size),
                                  frozen_by_category=by_category, positions=an.n_positions)
        self.barrier_ops = dict(an.unsupported)
        self.layers = group_layers(graph, an, groups, None)
        self.exporter = ExporterFindings(folded_batchnorm(graph))
        tied = sorted(name for name, (n, nonzero) in an.shared.items() if nonzero.any())
        if tied:
            self.warnings.append(
                f"{len(tied)} parameter tensor(s) are read by several nodes ({', '.join(tied[:3])}"
                f"{', ...' if len(tied) > 3 else ''}): the channels they join were tied so that each keeps one "
                f"value per element (an exporter that merges equal initializers causes this)")
        folded = folded_batchnorm_warning(graph)
        if folded:
            self.warnings.append(folded)
        if groups.count == 0:
            why = ", ".join(f"{n} {cat.replace('_', ' ')}" for cat, n in sorted(by_category.items(), key=lambda kv: -kv[1]))
            if self.frozen:
                first = self.frozen[0].reason
            elif an.cut_nodes:  # every node that could make a neuron is a barrier: say why for the first
                first = f"no neuron found, the first barrier: {an.cut_nodes[min(an.cut_nodes)]}"
            else:
                first = "no neuron found (no Conv, Gemm, MatMul, Einsum, ... with a constant weight)"
            self.warnings.append(f"no rescalable group: the output has the same weights as the input (frozen groups: "
                                 f"{why or 'none'}; e.g. {first})")

    def describe_bn_statistics(self, an: Analysis, groups: Groups, would_free: int) -> None:
        """Off: how many frozen groups feed a BatchNorm and how many more groups --bn-statistics
        would free. On: how many BatchNorms' running statistics carry their input's scale."""
        frozen_before_bn = self.groups.frozen_by_category.get("before_bn", 0) if self.groups is not None else 0
        carried_nodes = carried_groups = 0
        if an.bn_statistics:  # the running variance's use exists only where the statistics carry a scale
            per_node = [groups.of_position[use.rows[use.rows >= 0]] for use in an.uses if use.role == "bn_var"]
            per_node = [ids[ids >= 0] for ids in per_node]
            carried_nodes = sum(1 for ids in per_node if ids.size)
            carried_groups = int(np.unique(np.concatenate(per_node)).size) if per_node else 0
        self.bn_statistics = BatchNormStatistics(enabled=an.bn_statistics, frozen_before_bn=frozen_before_bn,
                                                 would_free=would_free, carried_nodes=carried_nodes,
                                                 carried_groups=carried_groups)

    def describe_statistics(self, runtime: RuntimeInfo) -> None:
        """What computed diag(G); its notice (e.g. CUDA asked for but not used) is a warning."""
        self.statistics = runtime
        if runtime.notice:
            self.warnings.append(runtime.notice)

    def describe_statistics_skipped(self, criterion: str) -> None:
        """The criterion needs no diag(G) (ENorm reads the parameter values only)."""
        self.statistics_skipped = f"not needed: the {criterion} criterion uses the parameter values only"

    def describe_solution(self, graph: Graph, an: Analysis, groups: Groups, solution, max_iter: int,
                          tol: float) -> None:
        """The criterion before and after (its own summary), the solver's run (with the groups
        its bounds held, bounds.Bounds), and λ per layer. `solution` is a plan.Solution."""
        result, limits = solution.result, solution.limits
        u = result.u
        lam = np.exp(u / 2.0) if u.size else np.ones(1)
        self.criterion = solution.criterion.summary(solution.problem, result)
        exact = result.method != "coordinate-descent"
        on = limits.on_bound(u)
        self.solver = SolverSummary(
            method=result.method, sweeps=result.sweeps, unit="iterations" if exact else "sweeps",
            change_name="gradient norm" if exact else "sum |du|", last_change=result.last_change,
            converged=result.converged, max_iter=max_iter, tol=tol, F_before=result.objective_before,
            F_after=result.objective_after, F_history=result.history,
            max_abs_u=float(np.abs(u).max()) if u.size else 0.0, lambda_min=float(lam.min()),
            lambda_max=float(lam.max()), seconds=result.seconds, kkt_residual=result.kkt_residual,
            bounded=int((limits.variance | limits.half_range).sum()), on_bound=int(on.sum()),
            on_variance_bound=int((on & limits.variance).sum()), on_range_bound=int((on & limits.half_range).sum()))
        self.layers = group_layers(graph, an, groups, u)

    def describe_no_solution(self, max_iter: int, tol: float) -> None:
        """No rescalable group: neither statistics nor solver ran (the criterion stays empty)."""
        self.solver = SolverSummary(
            method=SKIPPED, sweeps=0, unit="sweeps", change_name="", last_change=0.0, converged=True,
            max_iter=max_iter, tol=tol, F_before=None, F_after=None, F_history=[], max_abs_u=0.0,
            lambda_min=1.0, lambda_max=1.0, seconds=0.0)

    def describe_rewrite(self, rewritten: List[RewrittenTensor]) -> None:
        """The tensors that changed; a warning for any that comes near its dtype's largest value."""
        self.rewritten = list(rewritten)
        for r in self.rewritten:
            limit = _DTYPE_LIMITS.get(r.dtype)
            if limit and r.max_abs_after > 0.1 * limit:
                self.warnings.append(f"rescaled '{r.name}' ({r.dtype}) reaches {r.max_abs_after:.3g}, "
                                     f"close to the largest {r.dtype} value")

    def describe_verification(self, check: Verification, seed: int) -> None:
        self.verification = VerificationSummary(
            engine=check.engine, rtol=check.rtol, max_rel=check.max_rel, passed=check.passed, seed=seed,
            input_shapes={k: list(v) for k, v in check.input_shapes.items()}, outputs=list(check.outputs),
            precision=check.precision, rounding_noise=check.noise)

    # ---------------------------------------------------------------- text
    def summary(self, verbose: bool = False) -> str:
        lines = []
        arrow = f"{self.input} -> {self.output}" if self.output else (self.input or "model")
        lines.append(f"onnx-pathcond: {arrow}")
        m = self.model
        if m is not None:
            lines.append(f"  model      {m.nodes} nodes, {m.parameter_tensors} parameter tensors ({m.parameters:,} values)")
        g = self.groups
        if g is not None:
            frozen_bits = [f"{n} {cat.replace('_', ' ')}"
                           for cat, n in sorted(g.frozen_by_category.items(), key=lambda kv: -kv[1])]
            lines.append(f"  groups     {g.rescalable} rescalable in {len(self.layers)} layer{'s' if len(self.layers) != 1 else ''}, {g.frozen} frozen"
                         + (f" ({', '.join(frozen_bits)})" if frozen_bits else ""))
        b = self.bn_statistics
        if b is not None and b.enabled and b.carried_nodes:
            lines.append(f"  bn stats   {b.carried_nodes} BatchNormalization input(s) carry their scale in the running "
                         f"statistics ({b.carried_groups} groups)")
        elif b is not None and not b.enabled and b.frozen_before_bn:
            lines.append(f"  bn stats   {b.frozen_before_bn} of the frozen groups feed BatchNormalization: "
                         f"--bn-statistics would make {b.would_free} more groups rescalable")
        if self.barrier_ops:
            lines.append("  barriers   " + ", ".join(f"{op} x{n}" for op, n in sorted(self.barrier_ops.items())))
        shown = self.frozen if verbose else self.frozen[:6]
        for f in shown:
            lines.append(f"    frozen   {f.tensor}[{f.channels}]: {f.reason}")
        if len(shown) < len(self.frozen):
            lines.append(f"    ... {len(self.frozen) - len(shown)} more frozen ranges (see -v or --report)")
        st = self.statistics
        if st is not None:
            placed = st.nodes_by_provider
            where = (", ".join(f"{p} {n:,} nodes" for p, n in placed.items()) if placed else ", ".join(st.providers))
            bound = f", entries within {st.relative_error:.1e}" if st.precision == "float32" else ""
            lines.append(f"  diag(G) on {st.backend} ({where}; {st.precision}{bound})")
            if st.float64_because and verbose:
                lines.append(f"    float64  {st.float64_because}")
            if st.cpu_fallback_ops and verbose:
                lines.append("    on CPU   " + ", ".join(f"{op} x{n}" for op, n in st.cpu_fallback_ops.items()))
        elif self.statistics_skipped:
            lines.append(f"  diag(G)    {self.statistics_skipped}")
        c = self.criterion
        if c is not None and c.name == "enorm":
            lines.append(f"  criterion  enorm: F = sum of squared parameters {c.F_before:.6g} -> {c.F_after:.6g}"
                         f"   |theta| max/min {c.max_before:.3g}/{c.min_before:.3g} -> {c.max_after:.3g}/"
                         f"{c.min_after:.3g}   ({c.entries:,} non-zero)")
        elif c is not None:
            lines.append(f"  diag(G)    AM/GM {c.am_gm_before:.4g} -> {c.am_gm_after:.4g}"
                         f"   max/min {c.max_before:.3g}/{c.min_before:.3g} -> {c.max_after:.3g}/{c.min_after:.3g}"
                         f"   ({c.entries:,} entries)")
        s = self.solver
        if s is not None and s.method == SKIPPED:
            lines.append(f"  solver     {SKIPPED}")
        elif s is not None:
            which = f" ({c.name})" if c is not None else ""
            lines.append(f"  solver     {s.method}{which}: {s.sweeps} {s.unit}, last {s.change_name} "
                         f"{s.last_change:.3g}, F {s.F_before:.6g} -> {s.F_after:.6g}, max |u| {s.max_abs_u:.3g} "
                         f"(lambda in [{s.lambda_min:.3g}, {s.lambda_max:.3g}])")
            if s.bounded:
                why = [f"{n} by {what}" for n, what in ((s.on_variance_bound, "a running variance"),
                                                        (s.on_range_bound, "a half-precision range")) if n]
                lines.append(f"  bounds     {s.on_bound} of {s.bounded} bounded groups end on their bound"
                             + (f" ({', '.join(why)})" if why else "")
                             + f"; KKT residual {s.kkt_residual:.2g}")
        if verbose:
            for row in self.layers:
                lam = (f" lambda {row.lambda_min:.3g}..{row.lambda_median:.3g}..{row.lambda_max:.3g}"
                       if row.lambda_min is not None else "")
                lines.append(f"    layer    {row.op_type:<20} {row.tensor:<30} {row.groups:>6} groups{lam}")
        v = self.verification
        if v is not None:
            noise = f", the model's own rounding noise {v.rounding_noise:.3g}" if v.rounding_noise is not None else ""
            lines.append(f"  check      {v.engine}: max difference {v.max_rel:.3g} relative to output scale "
                         f"(rtol {v.rtol:.3g} for {v.precision}{noise}) -> {'equivalent' if v.passed else 'MISMATCH'}")
        elif self.timings.get("verify") is None and self.output:
            lines.append("  check      skipped (--no-verify)")
        if self.timings:
            lines.append("  time       " + "  ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        for w in self.warnings:
            lines.append(f"  warning    {w}")
        return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else str(f)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj
