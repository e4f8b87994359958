"""The typed records a `Report` holds, one per thing a run found or did.

Each record is read by its fields (`report.solver.converged`, `report.model.parameters`); its
`as_dict()` is its object in the JSON report (`report.to_dict()`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from .verify import OutputDifference


class Record:
    """Base of the report's records: their JSON form."""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelSummary(Record):
    external_data_tensors: int  # tensors the input file stores as external data
    nodes: int
    parameter_tensors: int  # stored tensors read as weights by rescalable ops
    parameters: int  # their elements
    opsets: Dict[str, int]
    producer: str
    inputs: Dict[str, List[int]]  # graph input shapes as analysed


@dataclass
class GroupCounts(Record):
    rescalable: int
    frozen: int
    frozen_by_category: Dict[str, int]
    positions: int  # candidate neurons: every channel of every tensor analysed


@dataclass
class LayerGroups(Record):
    """The groups one node created, with λ = exp(u/2) once solved."""

    node: str
    op_type: str
    tensor: str
    groups: int
    positions: int
    lambda_min: Optional[float] = None
    lambda_median: Optional[float] = None
    lambda_max: Optional[float] = None

    def as_dict(self) -> dict:
        record = asdict(self)
        if self.lambda_min is None:  # before the solver ran: no λ to tell
            for key in ("lambda_min", "lambda_median", "lambda_max"):
                del record[key]
        return record


@dataclass
class FrozenRange(Record):
    """Frozen groups that start in one tensor, for one reason."""

    node: str
    tensor: str
    channels: str  # '0-15,32'
    groups: int
    category: str
    reason: str


@dataclass
class BatchNormStatistics(Record):
    """What --bn-statistics did, or would do when it is off."""

    enabled: bool
    frozen_before_bn: int  # frozen groups whose first reason is that they feed a BatchNormalization
    would_free: int  # option off: how many more groups the option would make rescalable
    carried_nodes: int = 0  # option on: BatchNormalizations whose running statistics carry a scale
    carried_groups: int = 0  # option on: rescalable groups among those BatchNorms' inputs


@dataclass
class ExporterFindings(Record):
    folded_batchnorm: Dict[str, List[str]]  # evidence by kind; empty when none


@dataclass
class CriterionSummary(Record):
    name: str  # "pathcond" or "enorm"
    entries: int  # entries of diag(G) (pathcond) or non-zero parameter elements (enorm) in the criterion
    F_before: float
    F_after: float
    am_gm_before: Optional[float]  # of diag(G); None for enorm, which does not compute it
    am_gm_after: Optional[float]
    max_before: float  # largest / smallest positive diag(G) entry (pathcond) or non-zero |θ| (enorm)
    min_before: float
    max_after: float
    min_after: float
    # what F is
    objective: str = "p·log Σ g·exp(Bu) − Σ Bu over the p entries of diag(G): p·log(AM/GM) of the rescaled " \
                     "diag(G), up to a constant"


@dataclass
class SolverSummary(Record):
    method: str
    sweeps: int
    unit: str  # what `sweeps` counts: "sweeps" or "iterations"
    change_name: str  # what `last_change` measures
    last_change: float
    converged: bool
    max_iter: int
    tol: float
    F_before: float
    F_after: float
    F_history: List[float]
    max_abs_u: float
    lambda_min: float
    lambda_max: float
    seconds: float
    # max |projected ∇F| at the result over max |∇F(0)|: 0 at the optimum within the bounds
    kkt_residual: float = 0.0
    # groups whose u the solve kept within bounds (bounds.py): a BatchNorm's running variance
    # stays >= 0 (with --bn-statistics), half-precision weights and activations stay in their
    # dtype's range;
    # how many of them end on a bound, and on which kind
    bounded: int = 0
    on_bound: int = 0
    on_variance_bound: int = 0
    on_range_bound: int = 0


@dataclass
class VerificationSummary(Record):
    engine: str
    rtol: float
    max_rel: float
    passed: bool
    seed: int
    input_shapes: Dict[str, List[int]]
    outputs: List[OutputDifference] = field(default_factory=list)
    precision: str = "float32"  # what the model computes in: its default tolerance
    rounding_noise: Optional[float] = None  # the model's own, measured when the default was exceeded


@dataclass
class RewrittenTensor(Record):
    name: str
    consumer: str  # node that reads it
    op_type: str
    role: str
    dtype: str
    min_factor: float
    max_factor: float
    max_abs_after: float
