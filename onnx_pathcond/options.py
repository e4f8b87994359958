"""The choices a run offers and their defaults, in one place.

`rescale`, the command line and its `--help` all read them here, so that a default never
differs between the Python API and the command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from .errors import InputError, option


@dataclass(frozen=True)
class SolverSettings:
    """A solver and the stopping rule it runs with."""

    solver: str
    max_iter: int  # sweeps of coordinate descent, or iterations of the exact solver
    tol: float


# Each solver's own defaults: the authors' 10 sweeps of coordinate descent, stopped when a
# sweep moves u by less than 1e-2 in total; the exact solver run to convergence (gradient
# down to 1e-6 of its value at no rescaling), which takes tens of iterations, bounded at 1000.
SOLVERS: Dict[str, SolverSettings] = {
    "cd": SolverSettings("cd", max_iter=10, tol=1e-2),
    "exact": SolverSettings("exact", max_iter=1000, tol=1e-6),
}
DEFAULT_SOLVER = "cd"

# What the rescaling minimises: a criterion registered in `criteria/` (PathCond, the paper's
# criterion on diag(G), or ENorm, the squared norm of the parameters; docs/design.md §3.5).
# CRITERIA is what the command line offers, named here so that `--help` needs no numpy or
# onnx import; tests/pytorch/test_conditioner.py keeps it equal to the registry.
CRITERIA = ("pathcond", "enorm")
DEFAULT_CRITERION = "pathcond"

# ENorm's own defaults. Its coordinate descent is run to convergence, as Equi-normalization
# is meant to be: its minimiser only balances each neuron's incoming and outgoing norms, so
# there is no reason to stop early (PathCond's reason, docs/design.md §4.3). A sweep costs
# one pass over the parameters. Measured on MLPs built in code and on models/: once a sweep's
# Σ|Δu| is below 1e-3, u is within 5e-5 of the minimiser and E within 1e-11 (relative) of its
# minimum; that takes 8 sweeps on a 3-layer MLP, 29 on the folded ResNet of models/, 78 on a
# 3072-2048×6-10 MLP and 655 (4 s) on a 30-layer 64-wide MLP, where --solver exact needs 56
# iterations (0.2 s). The exact solver stops as for PathCond.
ENORM_SOLVERS: Dict[str, SolverSettings] = {
    "cd": SolverSettings("cd", max_iter=1000, tol=1e-3),
    "exact": SolverSettings("exact", max_iter=1000, tol=1e-6),
}

BACKENDS = ("auto", "numpy", "onnxruntime")
DEFAULT_BACKEND = "auto"
DEVICES = ("cpu", "cuda")
DEFAULT_DEVICE = "cpu"
# The numpy walk's arithmetic for diag(G). auto: float32 where the model's weights are at most
# 32-bit, its range guard passes and the criterion's result is proven no worse than no
# rescaling with the float32 bound (docs/design.md §2.6); float64 otherwise, and always with
# "float64". Measured on ResNet-50 (2 cores): the walk 0.71 s in float64, 0.46 s in float32.
PRECISIONS = ("auto", "float64")
DEFAULT_PRECISION = "auto"

# Largest accepted output difference, relative to the output's scale, when no rtol is
# given, by the precision the model computes in (its lowest float type): float32 rounding
# of a rescaled network stays around 1e-7 relative, half precision around 1e-3. A model
# whose own rounding noise is larger gets more (verify.py), never more than RTOL_CEILING.
DEFAULT_RTOL = {"float32": 1e-5, "float64": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
RTOL_CEILING = 0.1
NOISE_FACTOR = 10.0  # a correct result differs from the input by a few times the input's own noise
DEFAULT_SEED = 0
# Whether a BatchNormalization's input channel may carry a scale in the BN's running
# statistics (mean, variance): exact in inference, and in training mode up to ε (README,
# "BatchNorm statistics"). Off, those channels are frozen and BN stays exact in training too.
BN_STATISTICS = False
# With bn_statistics, a BatchNorm in training mode computes the original with ε/λ² in place of ε:
# its outputs move by about ε·|1 − λ⁻²|/(2σ²) (README, "BatchNorm statistics"; measured 1e-4
# to 2e-4 on the test networks). `onnx_pathcond.torch` accepts this much in its train-mode check.
BN_STATISTICS_TRAIN_RTOL = 1e-3


def check_tolerance(name: str, value: Optional[float]) -> None:
    """A tolerance is a finite number >= 0: NaN compares false with everything (a check
    against it never passes, or never stops), and an infinite one accepts anything."""
    if value is not None and not (0 <= value < float("inf")):
        raise InputError(f"{option(name)} must be a finite number >= 0, not {value}")


def check_backend(backend: str, device: str) -> None:
    if backend not in BACKENDS:
        raise InputError(f"unknown {option('backend')} '{backend}' (choose {', '.join(BACKENDS)})")
    if device not in DEVICES:
        raise InputError(f"unknown {option('device')} '{device}' (choose {' or '.join(DEVICES)})")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"unknown {option('precision')} '{precision}' (choose {' or '.join(PRECISIONS)})")
