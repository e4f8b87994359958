"""The statistics step: diag(G), the path-lifting statistics of every parameter (docs/design.md §2).

The path network is the model with every parameter squared, ReLU-like activations as the
identity, max pools as sums and averages with weights 1/n². Fed with ones (a batch of one, or
the batch the model fixes), its forward masses F and the adjoint masses R of S = Σ outputs
give each parameter element
g_i = ∂S/∂(θ_i²). Barriers cut the path network: their inputs count as outputs (adjoint 1)
and their outputs as inputs (mass 1).

The op rules describe their nodes as primitives (`pathnet/primitives.py`); one walk
(`pathnet/walk.py`) runs them on the numpy executor here, or writes them into an ONNX graph
run by onnxruntime (`pathnet/ort.py`). Either way the statistics reach the sink one parameter
use at a time, as `Statistic` records, so the full g never has to be held for all parameters.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np
import onnx

from .channels import Analysis
from .errors import InputError
from .options import BACKENDS
from .graph import Graph
from .pathnet import ort
from .pathnet.numpy_executor import NumpyExecutor, default_mass_budget
from .pathnet.precision import PrecisionLost, relative_bound
from .pathnet.records import RuntimeInfo, Sink, Statistic
from .pathnet.walk import PathWalk

__all__ = ["BACKENDS", "PrecisionLost", "RuntimeInfo", "Statistic", "compute_diag_g", "default_mass_budget",
           "diag_g_by_tensor", "float32_suits", "numpy_walk", "resolve_backend"]

def resolve_backend(backend: str, device: str = "cpu") -> str:
    """What `auto` means: onnxruntime for a GPU, numpy on the CPU.

    Measured on ResNet-50 with 2 CPU cores (benchmarks/bench_pipeline.py), the numpy executor
    computes diag(G) in 0.7 s with a 408 MiB peak where onnxruntime's CPU provider needs 1.8 s
    and 965 MB (no float64 convolution kernels there: the graph spells them out with slices
    and matrix products). So `auto` takes onnxruntime only when CUDA is asked for and present,
    and numpy otherwise; both can always be chosen by name.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}' (choose {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    return "onnxruntime" if device == "cuda" and ort.cuda_available() else "numpy"


def numpy_walk(graph: Graph, analysis: Analysis, sink: Sink, progress: Optional[Callable[[int, int], None]] = None,
               budget: Optional[float] = None, dtype=np.float64) -> PathWalk:
    """Run the path network with numpy in `dtype` (float64, or float32 under its range guard:
    `PrecisionLost` when that fails); the returned walk tells what it held, recomputed and,
    in float32, the roundings behind a statistic entry (`rounding_depth`)."""
    walk = PathWalk(graph, analysis, NumpyExecutor(graph, sink, dtype), progress, budget)
    walk.run()
    return walk


def float32_suits(graph: Graph, analysis: Analysis) -> bool:
    """Whether a float32 walk can be tried: every parameter the path network squares is
    stored in at most 32 bits (a float64 weight would be rounded, or flushed to zero, on
    the way in)."""
    for use in analysis.uses:
        if use.ignored:
            continue
        name = use.ref.name if use.ref is not None else use.input_name
        if name in graph.values:  # a value given to a plan (a training loop's parameter)
            if np.asarray(graph.values[name]).dtype == np.float64:
                return False
        elif graph.elem_type.get(name) == onnx.TensorProto.DOUBLE:  # read from the proto: no decoding
            return False
    return True


def compute_diag_g(graph: Graph, analysis: Analysis, sink: Sink, backend: str = "numpy", device: str = "cpu",
                   progress: Optional[Callable[[int, int], None]] = None, precision: str = "float64") -> RuntimeInfo:
    """Run the path network, calling `sink(Statistic)` once per parameter use.

    `precision` "float32" runs the numpy walk in float32 (numpy backend only): the result's
    `relative_error` bounds every entry's error, and `PrecisionLost` is raised (the sink may
    have had some statistics by then) when the range guard fails. Returns what ran it:
    backend, execution providers, precision, and any notice.
    """
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device '{device}' (choose cpu or cuda)")
    requested = backend
    backend = resolve_backend(backend, device)
    if precision not in ("float64", "float32"):
        raise InputError(f"unknown precision '{precision}' of the statistics (float64 or float32)")
    if precision == "float32" and backend != "numpy":
        raise InputError("float32 statistics run on the numpy backend only")
    if backend == "numpy":
        walk = numpy_walk(graph, analysis, sink, progress, dtype=np.dtype(precision))
        bound = relative_bound(walk.rounding_depth) if precision == "float32" else 0.0
        if not bound < 1.0:
            raise PrecisionLost(f"the float32 bound is void: {walk.rounding_depth} roundings behind one entry")
        notice = ""
        if device == "cuda":
            notice = ("CUDA was asked for but onnxruntime has no CUDA execution provider here (install "
                      "onnx-pathcond[gpu]); diag(G) ran on the CPU with numpy") if requested == "auto" else \
                "the numpy backend runs on the CPU only; device cuda needs backend onnxruntime"
        return RuntimeInfo(requested=device, backend="numpy", providers=["numpy"], precision=precision,
                           relative_error=bound, notice=notice)
    return ort.compute_diag_g(graph, analysis, sink, device=device)


def diag_g_by_tensor(graph: Graph, analysis: Analysis, backend: str = "numpy",
                     device: str = "cpu") -> Dict[str, np.ndarray]:
    """g of every rewritable parameter, in its stored layout, summed over its uses.

    Holds all of g at once: for tests and inspection, not for the main pipeline.
    """
    out: Dict[str, np.ndarray] = {}

    def collect(stat: Statistic) -> None:
        use, g = stat.use, stat.array()
        key = use.ref.name if use.ref is not None else use.input_name
        stored = use.ref.to_stored(g) if use.ref is not None else g
        out[key] = out[key] + stored if key in out else stored.copy()

    compute_diag_g(graph, analysis, collect, backend=backend, device=device)
    return out
