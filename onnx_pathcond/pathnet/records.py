"""Typed records the statistics step hands on: diag(G) per parameter use, and what ran it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..channels import ParamUse
from ..records import Record


@dataclass(frozen=True, eq=False)
class Statistic:
    """The diag(G) entries of one parameter use, in the use's layout (`use.view_shape`).

    Either `g` itself, or `factors` = (left, right) with g = left @ rightᵀ over the first two
    axes of the layout (a dense layer: g is a sum over positions of outer products, and the
    factors are far smaller when the positions are few). `array()` gives g in either case, in
    float64; `entries()` in the dtype the walk computed it in (float32 or float64).
    """

    use: ParamUse
    g: Optional[np.ndarray] = None
    factors: Optional[Tuple[np.ndarray, np.ndarray]] = None

    def array(self) -> np.ndarray:
        return np.asarray(self.entries(), dtype=np.float64)

    def entries(self) -> np.ndarray:
        if self.g is not None:
            return np.asarray(self.g).reshape(self.use.view_shape)
        left, right = self.factors
        return (np.asarray(left) @ np.asarray(right).T).reshape(self.use.view_shape)


# Where the statistics go: called once per parameter use (a tensor read by several nodes is
# reported once per reader), as soon as the backward pass has its entries.
Sink = Callable[[Statistic], None]


@dataclass
class RuntimeInfo(Record):
    """What actually computed the statistics (a record of the report)."""

    requested: str = "cpu"  # the device asked for: "cpu" or "cuda"
    backend: str = "numpy"
    providers: List[str] = field(default_factory=list)
    precision: str = "float64"
    relative_error: float = 0.0  # a bound on every entry's relative error (float32; beyond float64's own)
    float64_because: str = ""  # why float64, where float32 was tried first (docs/design.md §2.6)
    notice: str = ""
    nodes: int = 0  # nodes of the path-network graph (onnxruntime)
    # Nodes of the graph per provider that runs them, and the op types that ran on the CPU
    # although CUDA was asked for (onnxruntime >= 1.24 tells; empty before).
    nodes_by_provider: Dict[str, int] = field(default_factory=dict)
    cpu_fallback_ops: Dict[str, int] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)  # build, session, run, criterion (s)

    def as_dict(self) -> dict:
        """The report's record of the statistics."""
        record = {"backend": self.backend, "providers": self.providers, "precision": self.precision,
                  "notice": self.notice}
        if self.precision == "float32":
            record["relative_error_bound"] = self.relative_error
        if self.float64_because:
            record["float64_because"] = self.float64_because
        if self.backend == "onnxruntime":
            record.update(graph_nodes=self.nodes, timings=self.timings)
            if self.nodes_by_provider:
                record["nodes_by_provider"] = self.nodes_by_provider
            if self.cpu_fallback_ops:
                record["cpu_fallback_ops"] = self.cpu_fallback_ops
        return record
