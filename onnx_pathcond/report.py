"""The report: what was found, what was done, how well it worked — as JSON and as text."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .symmetry import Analysis, Groups
from .graph import Graph, node_label

STEPS = ("load", "analyse", "statistics", "solve", "rewrite", "verify", "save")


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


def group_layers(graph: Graph, an: Analysis, groups: Groups, u: Optional[np.ndarray]) -> List[dict]:
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
        row = {"node": node_label(node), "op_type": node.op_type, "tensor": block.tensor, "groups": e - s,
               "positions": int(groups.size[s:e].sum())}
        if u is not None:
            lam = np.exp(u[s:e] / 2.0)
            row.update(lambda_min=float(lam.min()), lambda_median=float(np.median(lam)), lambda_max=float(lam.max()))
        rows.append(row)
    return rows


def frozen_summary(graph: Graph, an: Analysis, groups: Groups) -> List[dict]:
    """Frozen groups, gathered by the tensor they start in and the reason."""
    roots = groups.frozen_roots
    if roots.size == 0:
        return []
    k, channel = _origins(an, roots)
    gathered: Dict[tuple, List[int]] = {}
    for r, blk, ch in zip(roots.tolist(), k.tolist(), channel.tolist()):
        reasons = groups.frozen_reasons.get(r) or [("barrier", "frozen")]
        category, reason = reasons[0]
        gathered.setdefault((blk, category, reason), []).append(ch)
    rows = []
    for (blk, category, reason), chans in gathered.items():
        block = an.blocks[blk]
        rows.append({"node": node_label(graph.nodes[block.node_index]), "tensor": block.tensor,
                     "channels": channel_ranges(np.array(chans)), "groups": len(chans),
                     "category": category, "reason": reason})
    return rows


@dataclass
class Report:
    input: Optional[str] = None
    output: Optional[str] = None
    model: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)
    layers: List[dict] = field(default_factory=list)
    frozen: List[dict] = field(default_factory=list)
    barrier_ops: Dict[str, int] = field(default_factory=dict)
    exporter: dict = field(default_factory=dict)
    statistics: dict = field(default_factory=dict)
    criterion: dict = field(default_factory=dict)
    solver: dict = field(default_factory=dict)
    rewritten: List[dict] = field(default_factory=list)
    verification: Optional[dict] = None
    warnings: List[str] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # ---------------------------------------------------------------- text
    def summary(self, verbose: bool = False) -> str:
        lines = []
        arrow = f"{self.input} -> {self.output}" if self.output else (self.input or "model")
        lines.append(f"onnx-pathcond: {arrow}")
        m = self.model
        if m:
            lines.append(f"  model      {m.get('nodes', 0)} nodes, {m.get('parameter_tensors', 0)} parameter tensors "
                         f"({m.get('parameters', 0):,} values)")
        g = self.groups
        if g:
            frozen_bits = []
            for cat, n in sorted(g.get("frozen_by_category", {}).items(), key=lambda kv: -kv[1]):
                frozen_bits.append(f"{n} {cat.replace('_', ' ')}")
            lines.append(f"  groups     {g.get('rescalable', 0)} rescalable in {len(self.layers)} layers, "
                         f"{g.get('frozen', 0)} frozen" + (f" ({', '.join(frozen_bits)})" if frozen_bits else ""))
        if self.barrier_ops:
            lines.append("  barriers   " + ", ".join(f"{op} x{n}" for op, n in sorted(self.barrier_ops.items())))
        shown = self.frozen if verbose else self.frozen[:6]
        for f in shown:
            lines.append(f"    frozen   {f['tensor']}[{f['channels']}]: {f['reason']}")
        if len(shown) < len(self.frozen):
            lines.append(f"    ... {len(self.frozen) - len(shown)} more frozen ranges (see -v or --report)")
        st = self.statistics
        if st:
            placed = st.get("nodes_by_provider")
            where = (", ".join(f"{p} {n:,} nodes" for p, n in placed.items()) if placed
                     else ", ".join(st.get("providers", [])))
            lines.append(f"  diag(G) on {st['backend']} ({where}; {st['precision']})")
            if st.get("cpu_fallback_ops") and verbose:
                lines.append("    on CPU   " + ", ".join(f"{op} x{n}" for op, n in st["cpu_fallback_ops"].items()))
        c = self.criterion
        if c.get("am_gm_before") is not None:
            after = c.get("am_gm_after")
            lines.append(f"  diag(G)    AM/GM {c['am_gm_before']:.4g}" + (f" -> {after:.4g}" if after is not None else "")
                         + f"   max/min {c['max_before']:.3g}/{c['min_before']:.3g}"
                         + (f" -> {c['max_after']:.3g}/{c['min_after']:.3g}" if c.get("max_after") is not None else "")
                         + f"   ({c.get('entries', 0):,} entries)")
        s = self.solver
        if s:
            lines.append(f"  solver     {s['method']}: {s['sweeps']} {s.get('unit', 'sweeps')}, "
                         f"last {s.get('change_name', 'change')} {s['last_change']:.3g}, F {s['F_before']:.6g} -> "
                         f"{s['F_after']:.6g}, max |u| {s['max_abs_u']:.3g} "
                         f"(lambda in [{s['lambda_min']:.3g}, {s['lambda_max']:.3g}])")
        if verbose:
            for row in self.layers:
                lam = (f" lambda {row['lambda_min']:.3g}..{row['lambda_median']:.3g}..{row['lambda_max']:.3g}"
                       if "lambda_min" in row else "")
                lines.append(f"    layer    {row['op_type']:<20} {row['tensor']:<30} {row['groups']:>6} groups{lam}")
        v = self.verification
        if v:
            lines.append(f"  check      {v['engine']}: max difference {v['max_rel']:.3g} relative to output scale "
                         f"(rtol {v['rtol']:.3g}) -> {'equivalent' if v['passed'] else 'MISMATCH'}")
        elif self.verification is None and self.timings.get("verify") is None and self.output:
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
