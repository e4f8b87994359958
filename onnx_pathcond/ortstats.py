"""diag(G) with onnxruntime: the path network and its adjoint as one ONNX graph.

The graph is built from the analysed model by the same walk as the numpy executor in
`stats.py`: each rule writes its path-network form (`onnx_forward`) and adjoint
(`onnx_backward`) with ONNX ops instead of numpy. Everything is float64. The CPU execution
provider has no float64 Conv or AveragePool, so there convolutions and pools are written as
strided slices and matrix products, which every provider runs in float64; for CUDA (cuDNN
has float64 convolutions) a Conv is written as Conv, ConvTranspose and Conv nodes, which
cost far fewer nodes (onnxruntime's session set-up grows with the node count).

The parameters are graph *inputs*, fed with the stored arrays (cast to float64 and squared
inside the graph), so the graph itself holds no copy of the weights. Its outputs are the g
of every parameter use, handed to the same callback as the numpy executor.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import InputError, ModelError
from .graph import Graph
from .ops import rule_for
from .symmetry import Analysis, ParamUse

DOUBLE = TensorProto.DOUBLE
OPSET = 18


@dataclass
class RuntimeInfo:
    """What actually ran the statistics."""

    requested: str  # "cpu" or "cuda"
    providers: List[str] = field(default_factory=list)
    precision: str = "float64"
    notice: str = ""
    nodes: int = 0
    # Nodes of the graph per provider that runs them, and the op types that ran on the CPU
    # although CUDA was asked for (onnxruntime >= 1.24 tells; empty before).
    nodes_by_provider: Dict[str, int] = field(default_factory=dict)
    cpu_fallback_ops: Dict[str, int] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)  # build, session, run, criterion (s)


    def as_dict(self) -> dict:
        """The report's record of the statistics."""
        record = {"backend": "onnxruntime", "providers": self.providers, "precision": self.precision,
                  "notice": self.notice, "graph_nodes": self.nodes, "timings": self.timings}
        if self.nodes_by_provider:
            record["nodes_by_provider"] = self.nodes_by_provider
        if self.cpu_fallback_ops:
            record["cpu_fallback_ops"] = self.cpu_fallback_ops
        return record


class OnnxPathNetwork:
    """Builds the path-network graph; the context rules write their ONNX forms into."""

    def __init__(self, graph: Graph, analysis: Analysis, native_conv: bool = False):
        self.graph = graph
        self.analysis = analysis
        # Write Conv as Conv (and its adjoints as ConvTranspose and Conv) for providers that have
        # float64 convolutions; otherwise as strided slices and matrix products.
        self.native_conv = native_conv
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self.inputs: List[onnx.ValueInfoProto] = []
        self.outputs: List[onnx.ValueInfoProto] = []
        self.feeds: Dict[str, np.ndarray] = {}
        self.g_outputs: Dict[str, Tuple[ParamUse, bool]] = {}  # name -> (use, given as factors)
        self._mass: Dict[str, str] = {}
        self._adjoint_parts: Dict[str, List[str]] = {}
        self._adjoint: Dict[str, str] = {}
        self._params: Dict[tuple, str] = {}
        self._feeds_of: Dict[str, str] = {}  # stored tensor -> graph input feeding it
        self.phase = "forward"
        self._stale: set = set()
        self._n = 0

    # ------------------------------------------------------------ building blocks
    def fresh(self, prefix: str = "t") -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs):
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype if dtype is not None else
                         (np.int64 if np.asarray(value).dtype.kind in "iub" else np.float64))
        name = self.fresh("c")
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64))

    def filled(self, shape, value: float) -> str:
        """A float64 tensor of the given shape, every element `value` (no stored copy)."""
        return self.op("ConstantOfShape", [self.ints(shape)],
                       value=numpy_helper.from_array(np.array([value], dtype=np.float64)))

    def reshape(self, name: str, shape) -> str:
        return self.op("Reshape", [name, self.ints(shape)])

    def transpose(self, name: str, perm) -> str:
        return self.op("Transpose", [name], perm=list(perm))

    def square(self, name: str) -> str:
        return self.op("Mul", [name, name])

    def reduce_sum(self, name: str, axes, keepdims: int = 0) -> str:
        return self.op("ReduceSum", [name, self.ints(axes)], keepdims=keepdims)

    def unbroadcast(self, name: str, from_shape, to_shape) -> str:
        """Adjoint of broadcasting `to_shape` up to `from_shape`: sum the broadcast axes."""
        from_shape, to_shape = tuple(from_shape), tuple(to_shape)
        if from_shape == to_shape:
            return name
        extra = len(from_shape) - len(to_shape)
        padded = (1,) * extra + to_shape
        axes = [i for i, (a, b) in enumerate(zip(from_shape, padded)) if b == 1 and a != 1] + list(range(extra))
        out = self.reduce_sum(name, sorted(set(axes)), keepdims=1) if axes else name
        return self.reshape(out, to_shape)

    # ------------------------------------------------------------ context for rules
    def shape(self, name: str):
        return self.graph.shape(name)

    def mass(self, name: str) -> str:
        if self.phase == "backward" and name in self._stale:
            # Recompute a cheap op's output for the backward pass rather than keep the forward
            # one alive until then (the same trade as the numpy executor).
            self._stale.discard(name)
            node = self.graph.producer[name]
            if self.graph.index(node) in self.analysis.cut_nodes:
                self._mass[name] = self.filled(self.graph.shape(name), 1.0)
            else:
                rule_for(node).onnx_forward(node, self)
        return self._mass[name]

    def set_mass(self, name: str, tensor: str) -> None:
        self._mass[name] = tensor

    def adjoint(self, name: str) -> str:
        if name in self._adjoint:
            return self._adjoint[name]
        parts = self._adjoint_parts.get(name, [])
        if not parts:
            result = self.filled(self.graph.shape(name), 0.0)
        elif len(parts) == 1:
            result = parts[0]
        else:
            result = self.op("Sum", parts)
        self._adjoint[name] = result
        return result

    def add_adjoint(self, name: str, tensor: str) -> None:
        self._adjoint_parts.setdefault(name, []).append(tensor)

    def use(self, node, role: str) -> ParamUse:
        return self.analysis.uses_by_node[self.graph.index(node)][role]

    def has_use(self, node, role: str) -> bool:
        return role in self.analysis.uses_by_node.get(self.graph.index(node), {})

    def param(self, node, role: str) -> Tuple[ParamUse, str]:
        """A parameter as the op sees it, in float64 (fed as a graph input)."""
        use = self.use(node, role)
        # Cast (and square) separately in each pass, so that no weight-sized float64 tensor has
        # to stay alive from the forward to the backward pass.
        key = (use.ref.name if use.ref is not None else use.input_name, str(use.ref.perm if use.ref else None),
               self.phase)
        if key in self._params:
            return use, self._params[key]
        if use.ref is not None:
            feed = self._feeds_of.get(use.ref.name)
            if feed is None:
                value = self.graph.stored_value(use.ref)
                if value.dtype.name == "bfloat16":  # onnxruntime takes no ml_dtypes arrays: widen exactly
                    value = value.astype(np.float32)
                feed = self._feeds_of[use.ref.name] = self.fresh("param")
                self.feeds[feed] = value
                self.inputs.append(helper.make_tensor_value_info(feed, helper.np_dtype_to_tensor_dtype(value.dtype),
                                                                 value.shape))
            tensor = feed if self.feeds[feed].dtype == np.float64 else self.op("Cast", [feed], to=DOUBLE)
            if use.ref.perm is not None:
                tensor = self.transpose(tensor, use.ref.perm)
        else:
            tensor = self.const(np.asarray(self.graph.constant_value(use.input_name), dtype=np.float64))
        self._params[key] = tensor
        return use, tensor

    def param_value(self, node, role: str) -> np.ndarray:
        """A small parameter (per-channel vector) in float64 on the host, as the op sees it,
        for rules that fold it into graph constants."""
        use = self.use(node, role)
        if use.ref is None:
            return np.asarray(self.graph.constant_value(use.input_name), dtype=np.float64)
        value = self.graph.stored_value(use.ref)
        if value.dtype.name == "bfloat16":
            value = value.astype(np.float32)
        value = np.asarray(value, dtype=np.float64)
        return value if use.ref.perm is None else value.transpose(use.ref.perm)

    def param_sq(self, node, role: str) -> Tuple[ParamUse, str]:
        key = ("squared", role, self.graph.index(node), self.phase)
        use, value = self.param(node, role)
        if key not in self._params:
            self._params[key] = self.square(value)
        return use, self._params[key]

    def constant(self, name: str) -> np.ndarray:
        return np.asarray(self.graph.constant_value(name), dtype=np.float64)

    def emit_g(self, use: ParamUse, tensor: Optional[str], factors: Optional[Tuple[str, str]] = None) -> None:
        """Make a use's g a graph output, or its two factors (g = left @ rightᵀ over its first
        two axes) for dense layers: much smaller, and multiplied out one use at a time."""
        if use.ignored:
            return
        name = f"g_{use.index}"
        if factors is not None:
            for suffix, part in zip(("left", "right"), factors):
                self.nodes.append(helper.make_node("Identity", [part], [f"{name}_{suffix}"]))
                self.outputs.append(helper.make_tensor_value_info(f"{name}_{suffix}", DOUBLE, None))
            self.g_outputs[name] = (use, True)
            return
        # The Reshape to the use's view writes the graph output itself (no Identity node).
        self.nodes.append(helper.make_node("Reshape", [tensor, self.ints(use.view_shape)], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, DOUBLE, list(use.view_shape)))
        self.g_outputs[name] = (use, False)

    # ------------------------------------------------------------ the passes
    def build(self) -> onnx.ModelProto:
        g = self.graph
        cut = self.analysis.cut_nodes
        for name in g.graph_inputs:
            if g.is_float(name):
                self._mass[name] = self.filled(g.shape(name), 1.0)
        active = []
        for node in g.nodes:
            if not any(g.is_activation(o) for o in node.output if o):
                continue
            active.append(node)
            if g.index(node) in cut:
                for o in node.output:
                    if o and g.is_activation(o) and g.is_float(o):
                        if g.shape(o) is None:
                            raise ModelError(f"the shape of tensor '{o}' is unknown; the statistics need static "
                                             f"shapes (give the input shapes with --input-shape)")
                        self._mass[o] = self.filled(g.shape(o), 1.0)
                continue
            rule_for(node).onnx_forward(node, self)
        for name in list(self._mass):
            producer = g.producer.get(name)
            if producer is not None and name not in g.graph_outputs and (
                    g.index(producer) in cut or getattr(rule_for(producer), "cheap_forward", False)):
                self._stale.add(name)
        self.phase = "backward"
        for name in g.graph_outputs:
            if name in self._mass:
                self.add_adjoint(name, self.filled(g.shape(name), 1.0))
        for node in reversed(active):
            if g.index(node) in cut:
                for i in dict.fromkeys(node.input):
                    if i and i in self._mass:
                        self.add_adjoint(i, self.filled(g.shape(i), 1.0))
            else:
                rule_for(node).onnx_backward(node, self)
        model = helper.make_model(helper.make_graph(self.nodes, "path_network", self.inputs, self.outputs,
                                                   initializer=self.initializers),
                                  opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        return model


def _import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError("the onnxruntime backend needs onnxruntime: pip install 'onnx-pathcond[cpu]' "
                         "(or [gpu] for CUDA)") from None
    return ort


def session_config(device: str, info: Optional[RuntimeInfo] = None):
    """Session options and providers for one run of the path network on `device`."""
    ort = _import_onnxruntime()
    wanted = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            # cuDNN's heuristic picks each convolution's algorithm without timing them all: the
            # graph runs once, so an exhaustive search would cost more than it can save.
            wanted = [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}), "CPUExecutionProvider"]
            _preload_cuda_libraries(ort)
        elif info is not None:
            info.notice = ("CUDA was asked for but this onnxruntime has no CUDAExecutionProvider "
                           "(install onnx-pathcond[gpu]); the statistics ran on the CPU")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # the graph runs once: give each buffer back when done
    options.enable_mem_pattern = False  # and do not plan one block for all intermediates
    # Nor optimise the graph: on ResNet-50 (benchmarks/bench_stats.py --opt-levels) optimising
    # costs more than the one run gains, 0.4 s on the CPU provider and 0.13 s on CUDA (H200).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options, wanted


def _session(model: onnx.ModelProto, device: str, info: RuntimeInfo):
    """A session for `model` on `device`, or None when CUDA is there but cannot start."""
    ort = _import_onnxruntime()
    options, wanted = session_config(device, info)
    # Which provider runs each node: the providers a session lists are only those it may use.
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=wanted)
    except Exception as exc:  # a provider that is listed but cannot start (missing CUDA libraries)
        if device != "cuda" or wanted == ["CPUExecutionProvider"]:
            raise
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        info.notice = f"CUDA was asked for but onnxruntime could not use it ({first_line}); the statistics ran on the CPU"
        return None
    info.providers = session.get_providers()
    _record_assignment(session, info)
    on_cuda = info.nodes_by_provider.get("CUDAExecutionProvider", 0)
    if device == "cuda" and "CUDAExecutionProvider" in info.providers and info.nodes_by_provider and not on_cuda:
        info.notice = "CUDA was asked for but onnxruntime placed no node of the statistics on it; they ran on the CPU"
    if device == "cuda" and "CUDAExecutionProvider" not in info.providers and not info.notice:
        info.notice = "CUDA was asked for but the session fell back to the CPU"
    return session


_preloaded = False


def _preload_cuda_libraries(ort) -> None:
    """Let onnxruntime find CUDA and cuDNN installed as pip packages (`onnxruntime-gpu[cuda,cudnn]`),
    which the dynamic loader does not search; libraries already on the loader's path are kept.
    onnxruntime prints what it could not load: that goes nowhere, since a session that cannot
    start CUDA is caught and reported by `_session` in one line."""
    global _preloaded
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is None or _preloaded:
        return
    _preloaded = True
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        try:
            preload()
        except Exception:  # nothing to preload from: the loader's own path decides
            pass


def _record_assignment(session, info: RuntimeInfo) -> None:
    """Count the nodes each provider runs (onnxruntime >= 1.24; nothing is recorded before)."""
    getter = getattr(session, "get_provider_graph_assignment_info", None)
    if getter is None:
        return
    try:
        subgraphs = getter()
    except Exception:  # an onnxruntime that has the call but did not record (older builds)
        return
    per_provider: Counter = Counter()
    off_cuda: Counter = Counter()
    for sub in subgraphs:
        for node in sub.get_nodes():
            per_provider[sub.ep_name] += 1
            if sub.ep_name != "CUDAExecutionProvider" and info.requested == "cuda":
                off_cuda[node.op_type] += 1
    info.nodes_by_provider = dict(per_provider.most_common())
    if "CUDAExecutionProvider" in per_provider:
        info.cpu_fallback_ops = dict(off_cuda.most_common())


def cuda_available() -> bool:
    """Whether the installed onnxruntime offers its CUDA execution provider."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def compute_diag_g(graph: Graph, analysis: Analysis, on_g: Callable[[ParamUse, np.ndarray], None],
                   device: str = "cpu", native_conv: Optional[bool] = None,
                   run: Optional[Callable[[onnx.ModelProto, List[str], Dict[str, np.ndarray]], list]] = None
                   ) -> RuntimeInfo:
    """Build the path-network graph, run it with onnxruntime, hand each use's g to `on_g`.

    `native_conv` writes convolutions as float64 Conv nodes: the default where CUDA runs the
    graph (cuDNN has them), never on onnxruntime's CPU provider (it has not). `run(model, names,
    feeds)` replaces the onnxruntime session (tests run the graph with onnx's reference
    evaluator, which has float64 convolutions on the CPU).
    """
    info = RuntimeInfo(requested=device)
    if native_conv is None:
        native_conv = device == "cuda" and run is None and cuda_available()
    start = time.perf_counter()
    builder = OnnxPathNetwork(graph, analysis, native_conv=native_conv)
    model = builder.build()
    info.nodes = len(model.graph.node)
    info.timings["build"] = time.perf_counter() - start
    if not builder.outputs:
        return info
    session = None
    if run is None:
        start = time.perf_counter()
        session = _session(model, device, info)
        if session is None or (native_conv and "CUDAExecutionProvider" not in info.providers):
            # CUDA is installed but did not start. The CPU provider has no float64 Conv: a graph
            # written with them is written again with convolutions as matrix products.
            if native_conv:
                builder = OnnxPathNetwork(graph, analysis, native_conv=False)
                model = builder.build()
                info.nodes = len(model.graph.node)
            on_cpu = RuntimeInfo(requested="cpu")
            session = _session(model, "cpu", on_cpu)
            info.providers, info.nodes_by_provider = on_cpu.providers, on_cpu.nodes_by_provider
        info.timings["session"] = time.perf_counter() - start
    else:
        info.providers = ["custom"]
    names = []
    for name, (use, factored) in builder.g_outputs.items():
        names.extend([f"{name}_left", f"{name}_right"] if factored else [name])
    start = time.perf_counter()
    outputs = session.run(names, builder.feeds) if session is not None else run(model, names, builder.feeds)
    results = dict(zip(names, outputs))
    del outputs, model
    info.timings["run"] = time.perf_counter() - start
    builder.feeds.clear()
    del session
    import inspect

    start = time.perf_counter()
    takes_factors = len(inspect.signature(on_g).parameters) >= 3
    for name, (use, factored) in builder.g_outputs.items():
        if factored:
            left, right = results.pop(f"{name}_left"), results.pop(f"{name}_right")

            def g(left=left, right=right, use=use):
                return (left @ right.T).reshape(use.view_shape)

            if takes_factors:
                on_g(use, g, (left, right))
            else:
                on_g(use, g())
        else:
            on_g(use, results.pop(name))  # each g goes as soon as it is consumed
    info.timings["criterion"] = time.perf_counter() - start
    return info
