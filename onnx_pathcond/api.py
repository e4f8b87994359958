"""The Python entry point: `rescale(model) -> (ModelProto, Report)`.

Data flows one way: load → analyse → statistics → solve → rewrite → verify, then the caller
saves. Each step is its own module; this file only wires them and times them.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Collection, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from . import protoio, rewrite, solve, stats, verify
from .criteria.pathcond import ProblemBuilder
from .errors import InputError, ModelError, SaveError, VerificationError
from .exporters import folded_batchnorm, folded_batchnorm_warning
from .graph import SKELETON_MAX_ELEMENTS, Graph, parse_input_shapes
from .report import Report, frozen_summary, group_layers
from .symmetry import analyse, build_groups

ModelLike = Union[str, os.PathLike, onnx.ModelProto]


# ---------------------------------------------------------------------------- load / save
def load_model(path: Union[str, os.PathLike]) -> onnx.ModelProto:
    """Read and check an ONNX file, with one-line errors for the ways that fails.

    External data is loaded into memory; `external_tensors(model)` remembers which tensors
    the file kept outside, so that `save_model` does the same.
    """
    return _load(path, lazy=False)[0]


def _load(path: Union[str, os.PathLike], lazy: bool) -> Tuple[onnx.ModelProto, Optional[protoio.FileWeights], List[str]]:
    """`load_model`; with `lazy`, the large float initializers keep their values in the file
    (inline or external data) and the returned `FileWeights` reads them when needed. The
    third value lists the files the model is read from: itself and its external data files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"input file '{path}' does not exist")
    if os.path.isdir(path):
        raise InputError(f"input '{path}' is a directory, not an ONNX file")
    weights = None
    try:
        if lazy:
            model, weights = protoio.read_skeleton(path, min_elements=SKELETON_MAX_ELEMENTS)
        else:
            model = onnx.load(path, load_external_data=False)
    except DecodeError as e:
        raise InputError(f"'{path}' is not an ONNX model (protobuf parse error: {e})") from None
    except Exception as e:  # truncated file, ...
        raise InputError(f"cannot read '{path}' as an ONNX model: {_one_line(e)}") from None
    if not model.graph.node and not model.graph.output:
        raise InputError(f"'{path}' is not an ONNX model (it parsed to an empty graph)")
    external = {t.name for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL}
    _EXTERNAL_TENSORS.pop(id(model), None)  # an entry left by a freed model that had this id
    files = [path] + sorted({os.path.join(os.path.dirname(path), _location(t)) for t in _all_tensors(model)
                             if t.data_location == onnx.TensorProto.EXTERNAL and _location(t)})
    if external:
        folder = os.path.dirname(os.path.abspath(path))
        try:
            if lazy:  # initializers stay in their files; Constant-node values are read now
                protoio.add_external_sources(model, folder, weights)
                for tensor in _attribute_tensors(model):
                    if tensor.data_location == onnx.TensorProto.EXTERNAL:
                        onnx.external_data_helper.load_external_data_for_tensor(tensor, folder)
                        tensor.data_location = onnx.TensorProto.DEFAULT
                        del tensor.external_data[:]
            else:
                onnx.external_data_helper.load_external_data_for_model(model, folder)
        except Exception as e:
            raise InputError(f"cannot read the external data of '{path}': {_one_line(e)}") from None
        _EXTERNAL_TENSORS[id(model)] = external
    check_model(model)
    return model, weights, files


def _location(tensor: onnx.TensorProto) -> str:
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), "")


# For a ModelProto read by load_model: the tensors its file kept in external data.
_EXTERNAL_TENSORS: Dict[int, set] = {}


def external_tensors(model: onnx.ModelProto) -> set:
    """Names of the tensors that the model's file stored as external data."""
    return _EXTERNAL_TENSORS.get(id(model), set())



def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    yield from _attribute_tensors(model)


def _attribute_tensors(model: onnx.ModelProto):
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def _one_line(error: Exception, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker with a one-line error, run on the weight-free skeleton of the model."""
    try:
        onnx.checker.check_model(protoio.skeleton(model))
    except onnx.checker.ValidationError as e:
        raise ModelError(f"the model fails onnx.checker: {_one_line(e) or 'invalid model'}") from None
    except ValueError as e:  # > 2 GB protobuf: cannot be checked in memory
        if "2GiB" not in str(e) and "2GB" not in str(e):
            raise ModelError(f"the model fails onnx.checker: {_one_line(e)}") from None


def check_output_path(output: Union[str, os.PathLike], input_path: Optional[str], overwrite: bool) -> str:
    """Refuse an output we could not or should not write, before doing any work."""
    output = os.fspath(output)
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise InputError(f"output directory '{os.path.dirname(output) or '.'}' does not exist")
    if os.path.isdir(output):
        raise InputError(f"output '{output}' is a directory")
    if input_path is not None and os.path.exists(output) and os.path.samefile(output, input_path) and not overwrite:
        raise InputError(f"output '{output}' is the input file; pass --overwrite to replace it")
    return output


def check_output_keeps_input(output: Union[str, os.PathLike], input_files: Sequence[str], writes_data: bool) -> None:
    """Refuse an output whose writing would replace a file the input is read from.

    The run writes OUT, and OUT + ".data" when the model keeps weights as external data; the
    input is read from its model file and its external data files. OUT being the input's
    model file itself is left to `check_output_path` (allowed with --overwrite: the input,
    its data file included, is then replaced as a whole)."""
    output = os.fspath(output)
    if not input_files or _same_file(output, input_files[0]):
        return
    written = [output] + ([output + ".data"] if writes_data else [])
    for target in written:
        for source in input_files:
            if _same_file(target, source):
                what = "input model" if source == input_files[0] else f"external data of the input '{input_files[0]}'"
                raise InputError(f"writing '{output}' would overwrite '{source}', the {what}; choose another output")


def _same_file(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _new_file_mode(path: str) -> int:
    """The mode a plain new file would get, or the mode of the file being replaced."""
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class PendingSave:
    """A model written into a temporary folder next to its target, not yet in place.

    `commit()` moves it into place (the data file before the model that points to it);
    leaving the `with` block without committing removes it. The tensors the input kept in
    external data stay external (`external` names them; default: those of the file the model
    was loaded from). A failure leaves nothing at the target and never touches the input.
    """

    def __init__(self, model: onnx.ModelProto, path: Union[str, os.PathLike],
                 external: Optional[Collection[str]] = None,
                 new_raw: Optional[Dict[str, Callable[[], np.ndarray]]] = None,
                 weights: Optional[protoio.FileWeights] = None):
        self.path = os.fspath(path)
        self.folder = os.path.dirname(os.path.abspath(self.path))
        self.name = os.path.basename(self.path)
        self.data_name = self.name + ".data"
        external = set(external_tensors(model) if external is None else external)
        new_raw = dict(new_raw or {})
        try:
            self.work = tempfile.mkdtemp(prefix=f".{self.name}.", suffix=".tmp", dir=self.folder)
        except OSError as e:
            raise SaveError(f"cannot write '{self.path}': {e.strerror or _one_line(e)}") from None
        initializers = [t for t in model.graph.initializer
                        if t.name in external and (t.HasField("raw_data") or (weights is not None and t.name in weights))]
        attributes = [t for t in _attribute_tensors(model) if t.name in external and t.HasField("raw_data")]
        self.has_data = bool(initializers or attributes)
        stubs: Dict[str, onnx.TensorProto] = {}
        restore = []
        try:
            try:
                if self.has_data:
                    with open(os.path.join(self.work, self.data_name), "wb") as data:
                        for tensor, in_node in [(t, False) for t in initializers] + [(t, True) for t in attributes]:
                            offset = data.tell()
                            protoio.write_raw(data, tensor, new_raw, weights)
                            new_raw.pop(tensor.name, None)
                            stub = protoio.external_stub(tensor, self.data_name, offset, data.tell() - offset)
                            if in_node:  # inside the graph's nodes: swapped in place, restored below
                                restore.append((tensor, tensor.raw_data))
                                tensor.CopyFrom(stub)
                            else:
                                stubs[tensor.name] = stub
                with open(self.model_path, "wb") as f:
                    protoio.write_model(model, f, replace=stubs, new_raw=new_raw, weights=weights)
            finally:  # give the caller its Constant-node values back, inline
                for tensor, raw in restore:
                    tensor.raw_data = raw
                    tensor.data_location = onnx.TensorProto.DEFAULT
                    del tensor.external_data[:]
        except OSError as e:
            self.discard()
            raise SaveError(f"cannot write '{self.path}': {e.strerror or _one_line(e)}") from None
        except BaseException:
            self.discard()
            raise

    @property
    def model_path(self) -> str:
        return os.path.join(self.work, self.name)

    def commit(self) -> None:
        try:
            mode = _new_file_mode(self.path)
            if self.has_data:
                os.chmod(os.path.join(self.work, self.data_name), mode)
                os.replace(os.path.join(self.work, self.data_name), os.path.join(self.folder, self.data_name))
            os.chmod(self.model_path, mode)
            os.replace(self.model_path, self.path)
        except OSError as e:
            raise SaveError(f"cannot write '{self.path}': {e.strerror or _one_line(e)}") from None
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()
        return False


def save_model(model: onnx.ModelProto, path: Union[str, os.PathLike], external: Optional[Collection[str]] = None) -> None:
    """Write atomically (see `PendingSave`)."""
    with PendingSave(model, path, external) as pending:
        pending.commit()


# ---------------------------------------------------------------------------- pipeline
class _Clock:
    def __init__(self, timings: Dict[str, float]):
        self.timings = timings

    @contextmanager
    def __call__(self, step: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[step] = self.timings.get(step, 0.0) + time.perf_counter() - t0


def _check_finite(graph: Graph, analysis) -> None:
    seen = set()
    for use in analysis.uses:
        if use.ref is None or use.ignored or use.ref.name in seen:
            continue
        seen.add(use.ref.name)
        value = graph.stored_value(use.ref)
        if value.dtype.kind == "f" or value.dtype.name == "bfloat16":
            if value.dtype.name == "bfloat16":
                value = value.astype(np.float32)
            # A float64 sum is finite exactly when every element is (a NaN or an infinity
            # propagates), short of overflow, which only float64 weights near 1e308 reach:
            # then each element is checked. No array as large as the tensor is made.
            with np.errstate(over="ignore", invalid="ignore"):
                total = value.sum(dtype=np.float64)
            if not np.isfinite(total) and not np.all(np.isfinite(value)):
                raise ModelError(f"parameter '{use.ref.name}' contains NaN or Inf values")


def analyse_model(model: onnx.ModelProto, input_shapes=None, weights: Optional[protoio.FileWeights] = None):
    """Graph view, symmetry analysis and groups (what --dry-run shows)."""
    if isinstance(input_shapes, (list, tuple)):
        input_shapes = parse_input_shapes(input_shapes)
    graph = Graph(model, input_shapes, weights)
    analysis = analyse(graph)
    groups = build_groups(analysis)
    return graph, analysis, groups


def rescale(model: ModelLike, *, input_shapes: Optional[Union[Dict[str, Tuple[int, ...]], Sequence[str]]] = None,
            solver: str = "cd", max_iter: int = 10, tol: float = 1e-2, verify_output: bool = True,
            rtol: Optional[float] = None, seed: int = 0, dry_run: bool = False,
            backend: str = "auto", device: str = "cpu", output: Optional[Union[str, os.PathLike]] = None,
            progress: Optional[Callable[..., None]] = None,
            return_model: bool = True) -> Tuple[Optional[onnx.ModelProto], Report]:
    """Rescale a ReLU network with PathCond; returns the new model and a report.

    `model` is a path or a ModelProto (a ModelProto is copied, never modified). The result
    computes the same function; with `verify_output` that is checked on random inputs and a
    mismatch above `rtol` raises `VerificationError`. `input_shapes` fixes dynamic input
    dimensions ({"x": (1, 3, 224, 224)} or ["x:1x3x224x224"]). `progress(step, done=None,
    total=None)` is called when a step starts and as it advances. With `dry_run`, only the
    analysis runs and the model is returned unchanged. `backend` computes diag(G) with numpy or
    onnxruntime (`auto`: onnxruntime when CUDA is asked for and available, numpy otherwise);
    `device="cuda"` asks onnxruntime for its CUDA execution provider (the report says which
    providers really ran, and how many nodes each). With `output`, the
    model is also saved there, and the file that is checked is the written one: it only
    takes its place once it has passed. With `output` and `return_model=False` (what the
    command line does) and a path as `model`, the large weights stay in the input file and
    are read when a step needs them, the rescaled ones are computed one tensor at a time as
    they are written, and None is returned in place of the model: the run never holds all
    the weights at once.
    """
    if solver not in ("cd", "exact"):
        raise InputError(f"unknown solver '{solver}' (choose cd or exact)")
    if max_iter < 0 or not tol >= 0:
        raise InputError("--max-iter and --tol must not be negative")
    stats.resolve_backend(backend)
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device '{device}' (choose cpu or cuda)")
    timings: Dict[str, float] = {}
    clock = _Clock(timings)
    say = progress or (lambda step, done=None, total=None: None)
    report = Report(timings=timings)
    stream = output is not None and not return_model and not dry_run
    weights = None
    say("load")
    with clock("load"):
        if isinstance(model, onnx.ModelProto):
            check_model(model)
            model = copy.deepcopy(model)
        else:
            report.input = os.fspath(model)
            # Streaming to a file, the weights are read from the input when they are needed
            # (statistics, then the save) instead of being held in memory all along.
            model, weights, files = _load(model, lazy=stream)
            if output is not None and not dry_run:
                check_output_keeps_input(output, files, writes_data=bool(external_tensors(model)))
    say("analyse")
    with clock("analyse"):
        graph, analysis, groups = analyse_model(model, input_shapes, weights)
        _check_finite(graph, analysis)
    _describe_analysis(report, graph, analysis, groups)
    if dry_run:
        return model, report
    say("statistics")
    with clock("statistics"):
        builder = ProblemBuilder(groups, analysis.uses, analysis.shared)
        report.statistics = stats.compute_diag_g(graph, analysis, builder.add, backend=backend, device=device,
                                                 progress=lambda done, total: say("statistics", done, total))
        problem = builder.finish()
    if report.statistics.get("notice"):
        report.warnings.append(report.statistics["notice"])
    say("solve")
    with clock("solve"):
        if solver == "exact":
            result = solve.exact_minimiser(problem, max_iter=max_iter, tol=tol,
                                           progress=lambda k, _: say("solve", k, max_iter))
        else:
            result = solve.coordinate_descent(problem, max_iter=max_iter, tol=tol,
                                              progress=lambda k, _: say("solve", k, max_iter))
    _describe_solution(report, problem, builder, result, groups, max_iter, tol)
    del problem, builder  # the statistics are summarised: free them before the weights are copied
    report.layers = group_layers(graph, analysis, groups, result.u)
    items = rewrite.plan(analysis.uses, groups, result.u)
    original = None
    if verify_output:  # the input file itself when there is one: no copy of the weights
        original = report.input if report.input is not None else (copy.deepcopy(model) if items else model)
    say("rewrite")
    with clock("rewrite"):
        if stream:
            summaries: list = []  # filled as the writer asks for each tensor's new values
            new_raw = rewrite.apply_streamed(graph, items, summaries)
        else:
            summaries, new_raw = rewrite.apply(graph, items), None
    pending = None
    if output is not None:
        say("save")
        with clock("save"):
            pending = PendingSave(model, output, new_raw=new_raw, weights=weights)
    try:
        order = {item.name: k for k, item in enumerate(items)}
        report.rewritten = [vars(r) for r in sorted(summaries, key=lambda r: order[r.name])]
        _dtype_warnings(report, summaries)
        shapes = verify.verification_shapes(model, graph.input_shapes) if verify_output else None
        if stream:  # only the written file is needed from here: let the input's weights go
            reference = protoio.skeleton(model)
            _EXTERNAL_TENSORS.pop(id(model), None)
            del model, graph, analysis, groups, items, new_raw, summaries, weights
            model = None
        else:
            reference = model
        if verify_output:
            say("verify")
            with clock("verify"):
                written = pending.model_path if pending is not None else reference
                check = verify.compare(original, written, reference, shapes, seed=seed, rtol=rtol)
            report.verification = {"engine": check.engine, "rtol": check.rtol, "max_rel": check.max_rel,
                                   "passed": check.passed, "seed": seed,
                                   "input_shapes": {k: list(v) for k, v in check.input_shapes.items()},
                                   "outputs": [vars(o) for o in check.outputs]}
            if not check.passed:
                worst = max(check.outputs, key=lambda o: o.max_rel)
                raise VerificationError(
                    f"the rescaled model differs from the input: output '{worst.name}' max difference "
                    f"{worst.max_rel:.3g} relative to its scale (rtol {check.rtol:.3g}); nothing was written")
        if pending is not None:
            with clock("save"):
                pending.commit()
            report.output = os.fspath(output)
    finally:
        if pending is not None:
            pending.discard()
    return model, report


def _describe_analysis(report: Report, graph: Graph, analysis, groups) -> None:
    uses = [u for u in analysis.uses if not u.ignored]
    stored = {u.ref.name for u in uses if u.ref is not None}
    n_params = 0
    for name in stored:
        shape = graph.shape(name)
        n_params += int(np.prod(shape)) if shape else 0
    report.model = {"external_data_tensors": len(external_tensors(graph.model)), "nodes": len(graph.nodes), "parameter_tensors": len(stored), "parameters": n_params,
                    "opsets": {o.domain or "ai.onnx": o.version for o in graph.model.opset_import},
                    "producer": f"{graph.model.producer_name} {graph.model.producer_version}".strip(),
                    "inputs": {k: list(v) for k, v in graph.input_shapes.items()}}
    report.frozen = frozen_summary(graph, analysis, groups)
    by_category: Dict[str, int] = {}
    for row in report.frozen:
        by_category[row["category"]] = by_category.get(row["category"], 0) + row["groups"]
    report.groups = {"rescalable": groups.count, "frozen": int(groups.frozen_roots.size),
                     "frozen_by_category": by_category, "positions": analysis.n_positions}
    report.barrier_ops = dict(analysis.unsupported)
    report.layers = group_layers(graph, analysis, groups, None)
    report.exporter = {"folded_batchnorm": folded_batchnorm(graph)}
    tied = sorted(name for name, (n, nonzero) in analysis.shared.items() if nonzero.any())
    if tied:
        report.warnings.append(
            f"{len(tied)} parameter tensor(s) are read by several nodes ({', '.join(tied[:3])}"
            f"{', ...' if len(tied) > 3 else ''}): the channels they join were tied so that each keeps one value "
            f"per element (an exporter that merges equal initializers causes this)")
    folded = folded_batchnorm_warning(graph)
    if folded:
        report.warnings.append(folded)
    if groups.count == 0:
        why = ", ".join(f"{n} {cat.replace('_', ' ')}" for cat, n in sorted(by_category.items(), key=lambda kv: -kv[1]))
        first = report.frozen[0]["reason"] if report.frozen else "no neuron found"
        report.warnings.append(f"no rescalable group: the output has the same weights as the input (frozen groups: "
                               f"{why or 'none'}; e.g. {first})")


def _describe_solution(report: Report, problem, builder, result, groups, max_iter, tol) -> None:
    u = result.u
    lam = np.exp(u / 2.0) if u.size else np.ones(1)
    max_after, min_after = problem.extremes(u)
    report.criterion = {
        "name": "pathcond", "entries": problem.p,
        "F_before": result.objective_before, "F_after": result.objective_after,
        "am_gm_before": float(np.exp(problem.log_am_gm(np.zeros(problem.H)))),
        "am_gm_after": float(np.exp(problem.log_am_gm(u))),
        "max_before": builder.g_max_before if problem.p else 0.0,
        "min_before": builder.g_min_before if problem.p else 0.0,
        "max_after": max_after, "min_after": min_after,
    }
    exact = result.method != "coordinate-descent"
    report.solver = {
        "method": result.method, "sweeps": result.sweeps, "unit": "iterations" if exact else "sweeps",
        "change_name": "gradient norm" if exact else "sum |du|", "last_change": result.last_change,
        "converged": result.converged, "max_iter": max_iter, "tol": tol,
        "F_before": result.objective_before, "F_after": result.objective_after, "F_history": result.history,
        "max_abs_u": float(np.abs(u).max()) if u.size else 0.0,
        "lambda_min": float(lam.min()), "lambda_max": float(lam.max()), "seconds": result.seconds,
    }


def _dtype_warnings(report: Report, rewritten) -> None:
    limits = {"float16": 65504.0, "bfloat16": 3.3e38, "float32": 3.4e38}
    for r in rewritten:
        limit = limits.get(r.dtype)
        if limit and r.max_abs_after > 0.1 * limit:
            report.warnings.append(f"rescaled '{r.name}' ({r.dtype}) reaches {r.max_abs_after:.3g}, "
                                   f"close to the largest {r.dtype} value")
