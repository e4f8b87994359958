"""The Python entry points: `rescale(model) -> (ModelProto, Report)`, and `rescale_file(IN, OUT)
-> Report`, what the command line runs.

A run is a pipeline: load → analyse → statistics → solve → rewrite → verify → save → report.
Each step is one short function below that calls its module and hands the next steps only
what they need; `rescale` calls them in that order and times each one.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import contextmanager
from typing import Callable, Collection, Dict, FrozenSet, Optional, Tuple, Union

import numpy as np
import onnx

from . import options, rewrite, verify
from .config import RescaleOptions
from .errors import InputError, SaveError, VerificationError
from .graph import Graph
from .shapes import parse_input_shapes
from .factors import PendingFactors
from .modelfile import ModelFile, PendingSave, check_other_writes, check_output_path
from .plan import RescalingPlan
from .report import Report
from .symmetry import analyse, build_groups, groups_freed_by_bn_statistics

PathLike = Union[str, os.PathLike]
ModelLike = Union[str, os.PathLike, onnx.ModelProto]


# ---------------------------------------------------------------------------- load / save
def load_model(path: Union[str, os.PathLike]) -> onnx.ModelProto:
    """Read and check an ONNX file, external data included, with one-line errors for the
    ways that fails."""
    return ModelFile.read(path).proto


def external_tensors(path: Union[str, os.PathLike]) -> FrozenSet[str]:
    """Names of the tensors that the ONNX file at `path` stores as external data (its
    weights are not read)."""
    return ModelFile.read(path, lazy=True).external


def save_model(model: onnx.ModelProto, path: Union[str, os.PathLike], external: Collection[str] = ()) -> None:
    """Write `model` to `path` atomically: into a temporary file next to it, then renamed.

    Tensors named in `external` are written to one data file, `path + ".data"`, the others
    inline. To keep the layout of an input file, pass `external=external_tensors(input_path)`
    (`rescale(..., output=)` does that by itself). A failure leaves nothing at `path`."""
    with ModelFile(model, external=external).write(path) as pending:
        pending.commit()


# ---------------------------------------------------------------------------- the steps
class _Clock:
    """Seconds per step of one run (added up when a step runs more than once), and the
    `progress` callback told when each step starts and how far it is."""

    def __init__(self, progress: Optional[Callable[..., None]]):
        self.timings: Dict[str, float] = {}
        self.say = progress or (lambda step, done=None, total=None: None)

    @contextmanager
    def __call__(self, step: str, announce: bool = True):
        if announce:
            self.say(step)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[step] = self.timings.get(step, 0.0) + time.perf_counter() - t0

    def move(self, seconds: float, source: str, target: str) -> None:
        """Count `seconds` timed under `source` under `target`, where the work belongs."""
        self.timings[source] -= seconds
        self.timings[target] = self.timings.get(target, 0.0) + seconds


def _load(model: ModelLike, lazy: bool, output: Optional[Union[str, os.PathLike]], also_writes, clock: _Clock
          ) -> ModelFile:
    """The model to work on: read from its path (with `lazy`, the large weights stay in the
    file until a step needs them), or a copy of the ModelProto given. Refused before any
    work when OUT or a file in `also_writes` is one the model is read from."""
    with clock("load"):
        if output is not None:  # an empty path or a directory, refused before any reading
            check_output_path(output, None, overwrite=True)
        check_other_writes(output, also_writes)
        if isinstance(model, onnx.ModelProto):
            return ModelFile.copy_of(model)
        source = ModelFile.read(model, lazy=lazy)
        source.check_output(output, also_writes)
        return source


def analyse_model(model: Union[onnx.ModelProto, ModelFile], input_shapes=None,
                  bn_statistics: bool = options.BN_STATISTICS):
    """Graph view, symmetry analysis and groups (what --dry-run shows)."""
    if isinstance(input_shapes, (list, tuple)):
        input_shapes = parse_input_shapes(input_shapes)
    graph = Graph(model, input_shapes)
    analysis = analyse(graph, bn_statistics=bn_statistics)
    groups = build_groups(analysis)
    return graph, analysis, groups


def _analyse(source: ModelFile, input_shapes, bn_statistics: bool, clock: _Clock) -> Tuple[RescalingPlan, int]:
    """The plan (graph, analysis, groups) and how many more groups bn_statistics would free."""
    with clock("analyse"):
        plan = RescalingPlan(source, input_shapes, bn_statistics)
        would_free = groups_freed_by_bn_statistics(plan.graph, plan.analysis, plan.groups)
    return plan, would_free


def _rewrite(graph: Graph, items, stream: bool, clock: _Clock) -> rewrite.Rewrite:
    """New values in the ModelProto; or, streaming, functions the writer calls for the large
    initializers (their time is moved from "save" to "rewrite" once written)."""
    with clock("rewrite"):
        return rewrite.apply_streamed(graph, items) if stream else rewrite.apply(graph, items)


def _write(source: ModelFile, output, rewritten: rewrite.Rewrite, clock: _Clock) -> PendingSave:
    pending = None
    try:
        with clock("save"):
            pending = source.write(output, new_values=rewritten.deferred)
        clock.move(rewritten.seconds, "save", "rewrite")
        return pending
    except BaseException:  # a stop signal between the writing and the caller's `try`: no folder left
        if pending is not None:
            pending.discard()
        raise


def _verify(original, written, reference: onnx.ModelProto, shapes, seed: int, rtol: Optional[float], precision: str,
            weights, clock: _Clock) -> verify.Verification:
    """Both models on the same random inputs; a mismatch above rtol is an error."""
    with clock("verify"):
        check = verify.compare(original, written, reference, shapes, seed=seed, rtol=rtol, precision=precision,
                               weights=weights)
    if not check.passed:
        worst = max(check.outputs, key=lambda o: o.max_rel)
        noise = "" if check.noise is None else \
            f", where the input model's own rounding noise is {check.noise:.3g}"
        if not np.isfinite(worst.max_abs):
            raise VerificationError(
                f"output '{worst.name}' is inf or NaN in one of the input and the rescaled model and finite in the "
                f"other (rescaled activations can pass the largest {check.precision} value); nothing was written")
        raise VerificationError(
            f"the rescaled model differs from the input: output '{worst.name}' max difference "
            f"{worst.max_rel:.3g} relative to its scale (rtol {check.rtol:.3g}{noise}); nothing was written")
    return check


def _commit(pending: PendingSave, clock: _Clock) -> None:
    with clock("save", announce=False):
        pending.commit()


# ---------------------------------------------------------------------------- the pipeline
def rescale(model: ModelLike, output: Optional[PathLike] = None, *, options: Optional[RescaleOptions] = None,
            dry_run: bool = False, factors: Optional[PathLike] = None, progress: Optional[Callable[..., None]] = None,
            **changes) -> Tuple[onnx.ModelProto, Report]:
    """Rescale a ReLU network with PathCond (or ENorm); returns the new model and a report.

    `model` is a path or a ModelProto (a ModelProto is copied, never modified). The options are
    those of `RescaleOptions` (onnx_pathcond/config.py), given as a record (`options=`) or as
    keywords (`solver="exact"`), keywords replacing the record's fields:

    - `criterion`: "pathcond" (default) or "enorm" (Equi-normalization: the sum of the squared
      parameters; needs no diag(G), and has its own solver defaults, `onnx_pathcond.options.ENORM_SOLVERS`);
    - `solver`: "cd" (the authors' coordinate descent) or "exact"; `max_iter` and `tol` left
      None take that solver's own defaults (`onnx_pathcond.options.SOLVERS`: cd 10 sweeps and 1e-2, exact
      1000 iterations and 1e-6);
    - `backend` computes diag(G) with numpy or onnxruntime (`auto`: onnxruntime when CUDA is
      asked for and available, numpy otherwise); `device="cuda"` asks onnxruntime for its CUDA
      execution provider (the report says which providers really ran, and how many nodes each);
    - `input_shapes` fixes dynamic input dimensions ({"x": (1, 3, 224, 224)} or ["x:1x3x224x224"]);
    - `bn_statistics`: a BatchNormalization's input channel is rescaled too, its scale carried
      by the BN's running mean and variance: exact in inference, and in training mode up to the
      BN's ε (README, "BatchNorm statistics");
    - `verify_output` (default True): the result is checked on random inputs drawn with `seed`,
      and a mismatch above `rtol` raises `VerificationError`.

    The result computes the same function. With `output`, the model is also saved there (never
    over a file the input is read from, other than the input itself), and the file that is
    checked is the written one: it only takes its place once it has passed. With `factors`, the
    element-wise factor new/old of every rewritten tensor is written to that .npz file
    (onnx_pathcond/factors.py), for carrying an optimizer's state in another framework; like the
    output, it is only in place once the run has succeeded. `progress(step, done=None,
    total=None)` is called when a step starts and as it advances. With `dry_run`, only the
    analysis runs, nothing is written, and the model is returned unchanged.

    To rescale a file into a file without holding its weights in memory, use `rescale_file`.
    """
    chosen = RescaleOptions.of(options, **changes)
    return _run(model, None if dry_run else output, chosen, dry_run, factors, progress, stream=False)


def rescale_file(model: PathLike, output: Optional[PathLike] = None, *, options: Optional[RescaleOptions] = None,
                 dry_run: bool = False, factors: Optional[PathLike] = None, report: Optional[PathLike] = None,
                 overwrite: bool = False, progress: Optional[Callable[..., None]] = None, **changes) -> Report:
    """What the command line runs: rescale the ONNX file `model` into the file `output` and
    return the report (options, `factors`, `progress` and `dry_run` as for `rescale`).

    The large weights stay in the input file and are read when a step needs them, the rescaled
    ones are computed one tensor at a time as they are written, and the input is let go before
    the written file is checked: the run never holds all the weights at once. `output` may be
    the input file itself only with `overwrite` (it is then replaced as a whole, its data file
    included). With `report`, the report is also written there as JSON, once the run has
    succeeded (a dry run's too). Every file the run will write is checked before any work: none
    may be a file the input is read from, and none another of them.
    """
    chosen = RescaleOptions.of(options, **changes)
    if output is None and not dry_run:
        raise InputError("no output path given: pass one, or dry_run=True to only analyse")
    model = os.fspath(model)
    if output is not None and not dry_run:
        check_output_path(output, model if os.path.exists(model) else None, overwrite)
    _, result = _run(model, None if dry_run else output, chosen, dry_run, factors, progress, stream=True,
                     also_writes={"report": report} if report is not None else None)
    if report is not None:
        _write_text(report, result.to_json())
    return result


def _write_text(path: PathLike, text: str) -> None:
    """Write a small file atomically: a temporary file beside it, renamed (nothing partial)."""
    path = os.fspath(path)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    except OSError as e:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise SaveError(f"could not write '{path}': {e.strerror or e}") from None


def _run(model: ModelLike, output: Optional[PathLike], chosen: RescaleOptions, dry_run: bool,
         factors: Optional[PathLike], progress, stream: bool, also_writes: Optional[Dict[str, PathLike]] = None
         ) -> Tuple[Optional[onnx.ModelProto], Report]:
    """The pipeline. With `stream` (and an output), the weights are read lazily, the new ones
    computed as they are written, and None is returned in place of the model."""
    stream = stream and output is not None
    clock = _Clock(progress)
    if factors is not None and not dry_run:
        also_writes = {**(also_writes or {}), "factors": factors}
    source = _load(model, stream, output, also_writes, clock)
    plan, would_free = _analyse(source, chosen.input_shapes, chosen.bn_statistics, clock)
    graph, analysis, groups = plan.graph, plan.analysis, plan.groups
    report = Report(input=source.path, timings=clock.timings)
    report.describe_analysis(graph, analysis, groups, external_tensors=len(source.external))
    report.describe_bn_statistics(analysis, groups, would_free)
    if dry_run:
        return source.proto, report

    settings = chosen.settings
    if groups.count:
        solution = plan.solve(chosen.solve_options(), clock=clock, say=clock.say)
        if solution.runtime is not None:
            report.describe_statistics(solution.runtime)
        else:
            report.describe_statistics_skipped(chosen.criterion)
            if chosen.backend != options.DEFAULT_BACKEND or chosen.device != options.DEFAULT_DEVICE:
                report.warnings.append(f"backend {chosen.backend} and device {chosen.device} have no effect with "
                                       f"the {chosen.criterion} criterion: no diag(G) is computed")
        report.describe_solution(graph, analysis, groups, solution, settings.max_iter, settings.tol)
        items = plan.rewrite_items(solution.u)
        del solution  # the statistics are summarised: free them before the weights are copied
    else:  # nothing can change: the statistics (the run's longest step) would only be thrown away
        report.describe_no_solution(settings.max_iter, settings.tol)
        items = []

    verify_output = chosen.verify_output
    original = None
    if verify_output:  # the input file itself when there is one: no copy of the weights
        original = source.path if source.path is not None else (copy.deepcopy(source.proto) if items else source.proto)
    factor_file = None
    if factors is not None:
        with clock("save", announce=False):
            factor_file = PendingFactors(factors, items)
    rewritten = _rewrite(graph, items, stream, clock)
    pending = None
    try:
        pending = _write(source, output, rewritten, clock) if output is not None else None
        report.describe_rewrite(rewritten.in_order(items))
        shapes = verify.verification_shapes(source.proto, graph.input_shapes) if verify_output else None
        precision = verify.compute_precision(graph.elem_type.values())
        parameters = {use.ref.name for use in analysis.uses if use.ref is not None}
        if stream:  # only the written file is needed from here: let the input's weights go
            reference, result_model = source.skeleton(), None
            del source, plan, graph, analysis, groups, items, rewritten
        else:
            reference = result_model = source.proto
        if verify_output:
            written = pending.model_path if pending is not None else reference
            report.describe_verification(_verify(original, written, reference, shapes, chosen.seed, chosen.rtol,
                                                 precision, parameters, clock),
                                         chosen.seed)
        if pending is not None:
            _commit(pending, clock)
            report.output = os.fspath(output)
        if factor_file is not None:
            factor_file.commit()
            report.factors = os.fspath(factors)
    finally:
        if pending is not None:
            pending.discard()
        if factor_file is not None:
            factor_file.discard()
    return result_model, report
