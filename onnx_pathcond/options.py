"""The choices a run offers and their defaults, in one place.

`rescale`, the command line and its `--help` all read them here, so that a default never
differs between the Python API and the command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from .errors import InputError


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

BACKENDS = ("auto", "numpy", "onnxruntime")
DEFAULT_BACKEND = "auto"
DEVICES = ("cpu", "cuda")
DEFAULT_DEVICE = "cpu"

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


def solver_settings(solver: str = DEFAULT_SOLVER, max_iter: Optional[int] = None,
                    tol: Optional[float] = None) -> SolverSettings:
    """`solver` with `max_iter` and `tol` as given, or its own defaults where they are None."""
    if solver not in SOLVERS:
        raise InputError(f"unknown solver '{solver}' (choose {' or '.join(SOLVERS)})")
    default = SOLVERS[solver]
    settings = SolverSettings(solver, default.max_iter if max_iter is None else max_iter,
                              default.tol if tol is None else tol)
    if settings.max_iter < 0:
        raise InputError("--max-iter must not be negative")
    check_tolerance("--tol", settings.tol)
    return settings


def check_tolerance(option: str, value: Optional[float]) -> None:
    """A tolerance is a finite number >= 0: NaN compares false with everything (a check
    against it never passes, or never stops), and an infinite one accepts anything."""
    if value is not None and not (0 <= value < float("inf")):
        raise InputError(f"{option} must be a finite number >= 0, not {value}")


def check_backend(backend: str, device: str) -> None:
    if backend not in BACKENDS:
        raise InputError(f"unknown backend '{backend}' (choose {', '.join(BACKENDS)})")
    if device not in DEVICES:
        raise InputError(f"unknown device '{device}' (choose {' or '.join(DEVICES)})")
