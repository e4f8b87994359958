"""diag(G) with onnxruntime: the path network written as one ONNX graph, run once.

`OnnxExecutor` writes the graph as the walk goes; here it is run on the CPU or the CUDA
execution provider and its outputs are handed to the sink as `Statistic` records.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Dict, List, Optional

import numpy as np
import onnx

from ..channels import Analysis
from ..errors import InputError
from ..graph import Graph
from .onnx_executor import OnnxExecutor
from .records import RuntimeInfo, Sink, Statistic
from .walk import PathWalk


def build(graph: Graph, analysis: Analysis, native_conv: bool = False) -> OnnxExecutor:
    """The path network of an analysed graph, written into an `OnnxExecutor` (its `model()`)."""
    executor = OnnxExecutor(graph, native_conv=native_conv)
    PathWalk(graph, analysis, executor).run()
    return executor


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


def compute_diag_g(graph: Graph, analysis: Analysis, sink: Sink, device: str = "cpu",
                   native_conv: Optional[bool] = None,
                   run: Optional[Callable[[onnx.ModelProto, List[str], Dict[str, np.ndarray]], list]] = None
                   ) -> RuntimeInfo:
    """Build the path-network graph, run it with onnxruntime, hand each use's g to `sink`.

    `native_conv` writes convolutions as float64 Conv nodes: the default where CUDA runs the
    graph (cuDNN has them), never on onnxruntime's CPU provider (it has not). `run(model, names,
    feeds)` replaces the onnxruntime session (tests run the graph with onnx's reference
    evaluator, which has float64 convolutions on the CPU).
    """
    info = RuntimeInfo(requested=device, backend="onnxruntime")
    if native_conv is None:
        native_conv = device == "cuda" and run is None and cuda_available()
    start = time.perf_counter()
    builder = build(graph, analysis, native_conv)
    model = builder.model()
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
                builder = build(graph, analysis, native_conv=False)
                model = builder.model()
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
    start = time.perf_counter()
    for name, (use, factored) in builder.g_outputs.items():
        if factored:
            sink(Statistic(use, factors=(results.pop(f"{name}_left"), results.pop(f"{name}_right"))))
        else:
            sink(Statistic(use, g=results.pop(name)))  # each g goes as soon as it is consumed
    info.timings["criterion"] = time.perf_counter() - start
    return info
