"""Numerical equivalence of the input and the rescaled model (docs/design.md §7).

Both models run on the same seeded random inputs, with onnxruntime on the CPU and every
graph optimisation off (so both run the same kernels), or with onnx's reference evaluator
when onnxruntime is not installed. Per output we report the largest absolute difference and
that difference relative to the output's scale (its largest magnitude).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import ModelError
from .options import DEFAULT_RTOL



@dataclass
class OutputDifference:
    name: str
    max_abs: float
    scale: float
    max_rel: float


@dataclass
class Verification:
    engine: str
    rtol: float
    outputs: List[OutputDifference] = field(default_factory=list)
    input_shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def passed(self) -> bool:
        return all(o.max_rel <= self.rtol for o in self.outputs)


def default_rtol(model: onnx.ModelProto) -> float:
    """The largest of the default tolerances of the model's outputs' dtypes."""
    worst = DEFAULT_RTOL["float32"]
    for out in model.graph.output:
        t = out.type.tensor_type.elem_type
        name = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}.get(t)
        if name:
            worst = max(worst, DEFAULT_RTOL[name])
    return worst


def verification_shapes(model: onnx.ModelProto, analysed: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
    """Input shapes to check with: as analysed, but a batch of 2 where the batch is dynamic."""
    shapes = {}
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        shape = list(analysed[vi.name])
        dims = vi.type.tensor_type.shape.dim
        if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0) and shape and shape[0] == 1:
            shape[0] = 2
        shapes[vi.name] = tuple(shape)
    return shapes


def random_inputs(model: onnx.ModelProto, shapes: Dict[str, Tuple[int, ...]], seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    initializers = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = shapes[vi.name]
        if np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16":
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[vi.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


@contextmanager
def _ort_source(model: Union[str, onnx.ModelProto]):
    """What to give InferenceSession: a path as is, a model as bytes (or, past the 2 GB
    protobuf limit, as a temporary file with external data)."""
    if isinstance(model, str):
        yield model
    elif model.ByteSize() < _PROTOBUF_LIMIT:
        yield model.SerializeToString()
    else:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.onnx")
            onnx.save(model, path, save_as_external_data=True, location="model.onnx.data")
            onnx.external_data_helper.load_external_data_for_model(model, folder)
            yield path


_PROTOBUF_LIMIT = 2_000_000_000


def _run(model: Union[str, onnx.ModelProto], feeds: Dict[str, np.ndarray]) -> Tuple[List[np.ndarray], str]:
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_cpu_mem_arena = False  # give memory back as soon as the run is over
        options.log_severity_level = 3
        try:
            with _ort_source(model) as source:
                session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
            return session.run(None, feeds), "onnxruntime"
        except Exception as e:
            raise ModelError(f"onnxruntime cannot run the model: {str(e).splitlines()[0]}") from None
    from onnx.reference import ReferenceEvaluator

    try:
        return [np.asarray(r) for r in ReferenceEvaluator(model).run(None, feeds)], "onnx reference evaluator"
    except Exception as e:
        raise ModelError(f"the reference evaluator cannot run the model: {str(e).splitlines()[0]}") from None


def compare(original: Union[str, onnx.ModelProto], rescaled: Union[str, onnx.ModelProto], model: onnx.ModelProto,
            shapes: Dict[str, Tuple[int, ...]], seed: int = 0, rtol: Optional[float] = None) -> Verification:
    """Run both on the same random inputs. Each may be a file path (cheaper than a copy of
    the model in memory: onnxruntime reads it itself); `model` says what inputs to make."""
    rtol = default_rtol(model) if rtol is None else rtol
    feeds = random_inputs(model, shapes, seed)
    before, engine = _run(original, feeds)
    after, _ = _run(rescaled, feeds)
    result = Verification(engine, rtol, input_shapes=dict(shapes))
    for out, a, b in zip(model.graph.output, before, after):
        a = np.asarray(a, dtype=np.float64) if np.asarray(a).dtype.kind in "fc" or np.asarray(a).dtype.name == "bfloat16" \
            else np.asarray(a)
        b = np.asarray(b, dtype=a.dtype)
        if a.dtype.kind not in "fc":
            same = np.array_equal(a, b)
            result.outputs.append(OutputDifference(out.name, 0.0 if same else np.inf, 1.0, 0.0 if same else np.inf))
            continue
        finite = np.isfinite(a)
        if not np.array_equal(finite, np.isfinite(b)) or not np.array_equal(a[~finite], b[~finite]):
            result.outputs.append(OutputDifference(out.name, np.inf, np.inf, np.inf))
            continue
        diff = float(np.abs(a[finite] - b[finite]).max()) if finite.any() else 0.0
        scale = float(np.abs(a[finite]).max()) if finite.any() else 0.0
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf)
        result.outputs.append(OutputDifference(out.name, diff, scale, rel))
    return result
