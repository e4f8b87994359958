"""Numerical equivalence of the input and the rescaled model (docs/design.md §7).

Both models run on the same seeded random inputs, with onnxruntime on the CPU and every
graph optimisation off (so both run the same kernels; weight pre-packing off too: one run
does not repay a packed copy of the weights), or with onnx's reference evaluator when
onnxruntime is not installed. A model given as a file is run from that file, its large
weights mapped from it where they lie (`mapped_model`): what is checked is the file's bytes.
Per output we report the largest absolute difference and that difference relative to the
output's scale (its largest magnitude).

The tolerance, unless given, follows the precision the model computes in (float16 weights
behind float32 inputs and outputs compute in float16). A rescaled model differs from its
input by rounding only: its weights are the input's rounded once more, and its ops round
other values. When the difference exceeds the precision's tolerance, the model's own
rounding noise is measured: the input model against itself with every weight moved by about
one unit in the last place (at random; the largest of a few draws), and, for a model
computing in half precision, against itself computed in float32 (its activations' rounding).
A correct result differs from the input by a few times that noise; a wrong one (a scale
applied on one side of a neuron only) by the scale itself. So the tolerance becomes
`NOISE_FACTOR` times the noise, up to `RTOL_CEILING`.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple, Union

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import ModelError
from .options import DEFAULT_RTOL, NOISE_FACTOR, RTOL_CEILING

NOISE_DRAWS = 4

_PRECISIONS = {TensorProto.BFLOAT16: "bfloat16", TensorProto.FLOAT16: "float16", TensorProto.FLOAT: "float32",
               TensorProto.DOUBLE: "float64"}


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
    precision: str = "float32"  # what the model computes in
    noise: Optional[float] = None  # the model's own rounding noise, when it was measured

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def passed(self) -> bool:
        return all(o.max_rel <= self.rtol for o in self.outputs)


def compute_precision(elem_types) -> str:
    """The lowest-precision float type among `elem_types` (TensorProto element types of the
    model's activations and weights): what its arithmetic rounds to."""
    found = [_PRECISIONS[t] for t in set(elem_types) if t in _PRECISIONS]
    order = list(_PRECISIONS.values())
    return min(found, key=order.index) if found else "float32"


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


def mapped_model(path: str) -> Optional[Tuple[bytes, str]]:
    """The model in the file at `path`, as onnxruntime can map it: its graph read from the
    file, and each large float initializer (inline or external) turned into an external-data
    reference to the very bytes that hold its value in the file (offset and length into the
    model file itself for an inline one). onnxruntime then maps those bytes from the file
    instead of parsing them into a ModelProto and copying them into its own tensors: the
    session holds the file's pages, not two copies of the weights. Returns the serialized
    model and the folder its locations are relative to, or None when the file has no weight
    to map (or cannot be walked so: the plain path is used then)."""
    from . import protoio
    from .modelfile import LEFT_IN_FILE_ABOVE

    try:
        skeleton, weights = protoio.read_skeleton(path, min_elements=LEFT_IN_FILE_ABOVE)
        folder = os.path.dirname(os.path.abspath(path))
        protoio.add_external_sources(skeleton, folder, weights)
    except Exception:  # noqa: BLE001 -- onnxruntime reads the file itself and says what is wrong
        return None
    mapped = False
    for tensor in skeleton.graph.initializer:
        source = weights.raw.get(tensor.name)
        if source is None:
            continue
        location = os.path.relpath(source.path, folder)
        tensor.CopyFrom(protoio.external_stub(tensor, location, source.offset, source.length))
        mapped = True
    if not mapped:
        return None
    return skeleton.SerializeToString(), folder


def session_options(ort, folder: Optional[str] = None):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False  # give memory back as soon as the run is over
    options.log_severity_level = 3
    # No pre-packed copy of the Gemm/MatMul weights: for one run, packing them costs a second
    # copy of the largest weights (memory and time); the kernels pack as they go instead.
    options.add_session_config_entry("session.disable_prepacking", "1")
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    return options


def _run(model: Union[str, onnx.ModelProto], feeds: Dict[str, np.ndarray]) -> Tuple[List[np.ndarray], str]:
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        mapped = mapped_model(model) if isinstance(model, str) else None
        if mapped is not None:
            try:
                session = ort.InferenceSession(mapped[0], session_options(ort, mapped[1]),
                                               providers=["CPUExecutionProvider"])
            except Exception:  # noqa: BLE001 -- the file as it is, below, gives the error to report
                session = None
            del mapped
            if session is not None:
                try:
                    return session.run(None, feeds), "onnxruntime"
                except Exception as e:
                    raise ModelError(f"onnxruntime cannot run the model: {str(e).splitlines()[0]}") from None
        try:
            with _ort_source(model) as source:
                session = ort.InferenceSession(source, session_options(ort), providers=["CPUExecutionProvider"])
            return session.run(None, feeds), "onnxruntime"
        except Exception as e:
            raise ModelError(f"onnxruntime cannot run the model: {str(e).splitlines()[0]}") from None
    from onnx.reference import ReferenceEvaluator

    try:
        return [np.asarray(r) for r in ReferenceEvaluator(model).run(None, feeds)], "onnx reference evaluator"
    except Exception as e:
        raise ModelError(f"the reference evaluator cannot run the model: {str(e).splitlines()[0]}") from None


def compare(original: Union[str, onnx.ModelProto], rescaled: Union[str, onnx.ModelProto], model: onnx.ModelProto,
            shapes: Dict[str, Tuple[int, ...]], seed: int = 0, rtol: Optional[float] = None,
            precision: str = "float32", weights: Optional[Set[str]] = None) -> Verification:
    """Run both on the same random inputs. Each may be a file path (cheaper than a copy of
    the model in memory: onnxruntime reads it itself); `model` says what inputs to make.
    `precision` is what the model computes in; `rtol` None takes the tolerance from it and,
    if needed, from the model's measured rounding noise (see the module docstring), for which
    the tensors named in `weights` (the rescalable parameters; None: every float tensor) are
    moved. A noise run that fails (a model onnxruntime cannot run so) leaves the tolerance be."""
    feeds = random_inputs(model, shapes, seed)
    before, engine = _run(original, feeds)
    after, _ = _run(rescaled, feeds)
    result = Verification(engine, DEFAULT_RTOL[precision] if rtol is None else rtol, input_shapes=dict(shapes),
                          precision=precision)
    result.outputs = _differences(model, before, after)
    if rtol is None and not result.passed:
        loaded = onnx.load(original) if isinstance(original, str) else original
        # The effect of one random rounding varies a lot from draw to draw on a small model
        # (a few weights decide an output): the largest of a few draws is taken.
        result.noise = 0.0
        try:
            for draw in range(NOISE_DRAWS):
                perturbed, _ = _run(_with_rounding_noise(loaded, seed + draw, weights), feeds)
                result.noise = max([result.noise] + [o.max_rel for o in _differences(model, before, perturbed)])
        except ModelError:
            result.noise = None
            return result
        if precision in ("float16", "bfloat16"):
            widened = _in_float32(loaded)
            try:
                wide, _ = _run(widened, {k: v.astype(np.float32) if v.dtype.name in ("float16", "bfloat16") else v
                                         for k, v in feeds.items()})
            except ModelError:  # an op with no float32 kernel: the weights' noise stands alone
                wide = None
            if wide is not None:
                result.noise = max([result.noise] + [o.max_rel for o in _differences(model, wide, before)])
        result.rtol = max(result.rtol, min(RTOL_CEILING, NOISE_FACTOR * result.noise))
    return result


def _in_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a half-precision model computing in float32: its half-precision tensors,
    values and types widened exactly (a Cast to half precision still rounds there, then
    widens: the copy holds the same values)."""
    narrow = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    tensors = list(wide.graph.initializer) + [a.t for n in wide.graph.node for a in n.attribute
                                              if a.type == onnx.AttributeProto.TENSOR]
    for tensor in tensors:
        if tensor.data_type in narrow:
            value = onnx.numpy_helper.to_array(tensor).astype(np.float32)
            tensor.CopyFrom(onnx.numpy_helper.from_array(value, tensor.name))
    nodes = []
    for node in wide.graph.node:
        to = next((a for a in node.attribute if a.name == "to"), None)
        if node.op_type == "Cast" and to is not None and to.i in narrow:
            rounded = node.output[0] + "__rounded"
            nodes += [node, helper.make_node("Cast", [rounded], [node.output[0]], to=TensorProto.FLOAT)]
            node.output[0] = rounded
            continue
        nodes.append(node)
    del wide.graph.node[:]
    wide.graph.node.extend(nodes)
    for vi in list(wide.graph.input) + list(wide.graph.output) + list(wide.graph.value_info):
        if vi.type.tensor_type.elem_type in narrow:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    return wide


def _with_rounding_noise(original: onnx.ModelProto, seed: int, weights: Optional[Set[str]] = None) -> onnx.ModelProto:
    """The model with each float weight (those named in `weights`, or every float tensor)
    multiplied by 1 + ε·r, r uniform in [−1, 1] and ε the unit roundoff of its dtype: as far
    from the input as a second rounding of its weights. (Other float constants, such as a
    Resize's scales, decide shapes: they stay as they are.)"""
    model = onnx.ModelProto()
    model.CopyFrom(original)
    rng = np.random.default_rng(seed + 1)
    tensors = [t for t in model.graph.initializer if weights is None or t.name in weights]
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR
                and (weights is None or (n.op_type == "Constant" and n.output[0] in weights))]
    for tensor in tensors:
        if tensor.data_type not in _PRECISIONS:
            continue
        value = onnx.numpy_helper.to_array(tensor)
        dtype = value.dtype
        wide = value.astype(np.float32) if dtype.name == "bfloat16" else value
        eps = {"bfloat16": 2.0 ** -8}.get(dtype.name, float(np.finfo(wide.dtype).eps) / 2)
        moved = wide.astype(np.float64) * (1.0 + eps * rng.uniform(-1.0, 1.0, wide.shape))
        tensor.CopyFrom(onnx.numpy_helper.from_array(moved.astype(dtype), tensor.name))
    return model


def _differences(model: onnx.ModelProto, before, after) -> List[OutputDifference]:
    outputs = []
    for out, a, b in zip(model.graph.output, before, after):
        a = np.asarray(a, dtype=np.float64) if np.asarray(a).dtype.kind in "fc" or np.asarray(a).dtype.name == "bfloat16" \
            else np.asarray(a)
        b = np.asarray(b, dtype=a.dtype)
        if a.dtype.kind not in "fc":
            same = np.array_equal(a, b)
            outputs.append(OutputDifference(out.name, 0.0 if same else np.inf, 1.0, 0.0 if same else np.inf))
            continue
        finite = np.isfinite(a)
        if not np.array_equal(finite, np.isfinite(b)) or not np.array_equal(a[~finite], b[~finite]):
            outputs.append(OutputDifference(out.name, np.inf, np.inf, np.inf))
            continue
        diff = float(np.abs(a[finite] - b[finite]).max()) if finite.any() else 0.0
        scale = float(np.abs(a[finite]).max()) if finite.any() else 0.0
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf)
        outputs.append(OutputDifference(out.name, diff, scale, rel))
    return outputs
