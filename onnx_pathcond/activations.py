"""How large the activations that a rescaling scales are, where they are computed in half
precision (docs/design.md §4.5).

A group's scale λ multiplies every activation that carries its channels, from the node that
creates them to the weights that read them: a float16 activation has as little room as a
float16 weight, and a hidden layer scaled up by 10⁵ overflows to inf (then inf · 0 = NaN past a
pruned weight) on inputs where the input model computes finite values. Weights are bounded
from their stored values (`bounds.solve_bounds`); activations depend on the inputs, so they are
measured: the model runs once per solve on seeded standard-normal inputs at the analysed
shapes, with every half-precision tensor that carries a free group as an extra output, and
`bounds.add_activation_bounds` keeps each group's largest activation within the dtype's range
with room for inputs `bounds.ACTIVATION_HEADROOM` times larger or smaller.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import verify
from .bounds import NARROW
from .graph import Graph
from .symmetry import Groups

SEED = 0  # the measuring inputs' seed: the same draw at every solve of a plan


def scaled_half_tensors(graph: Graph, analysis, groups: Groups) -> List[str]:
    """The half-precision activations, computed by the model's own top-level nodes, whose
    channels carry a free group (the tensors a rescaling multiplies)."""
    if not groups.count or not any(t in NARROW for t in graph.elem_type.values()):
        return []
    top_level = {o for n in graph.model.graph.node for o in n.output if o}
    names = []
    for name, layout in analysis.layouts.items():
        if layout is None or name not in top_level or graph.elem_type.get(name) not in NARROW:
            continue
        positions = layout.positions
        positions = positions[positions >= 0]
        if positions.size and (groups.of_position[positions] >= 0).any():
            names.append(name)
    return names


def measure(graph: Graph, names: List[str]) -> Optional[Dict[str, np.ndarray]]:
    """|value| of each tensor in `names` (float32), from one onnxruntime run of the model as
    the plan holds it on seeded standard-normal inputs; None when the model cannot be run so
    (no onnxruntime, a model that it refuses: the check after the rewrite says what is wrong)."""
    if not names:
        return {}
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    try:
        model, folder = _model_as_held(graph)
        present = {v.name for v in model.graph.output}
        model.graph.output.extend(helper.make_tensor_value_info(name, graph.elem_type[name], None)
                                  for name in names if name not in present)
        session = ort.InferenceSession(model.SerializeToString(), verify.session_options(ort, folder),
                                       providers=["CPUExecutionProvider"])
        del model
        feeds = verify.random_inputs(graph.model, graph.input_shapes, SEED)
        values = session.run(names, feeds)
    except Exception:  # noqa: BLE001 -- any failure leaves the activations unbounded, as before
        return None
    return {name: np.abs(np.asarray(value, dtype=np.float32)) for name, value in zip(names, values)}


def _model_as_held(graph: Graph):
    """A ModelProto that computes what the plan holds now, and the folder its external data
    lies in: the input file's own bytes mapped where the weights are still there (no copy of
    them), a copy of the model in memory otherwise; the plan's new values replace their
    tensors."""
    path = graph.file.path
    folder = None
    if path is not None:
        mapped = verify.mapped_model(path)
        if mapped is not None:
            model, folder = onnx.ModelProto.FromString(mapped[0]), mapped[1]
        else:  # no large weight in the file: it is small, read it whole
            model = onnx.load(path)
            folder = os.path.dirname(os.path.abspath(path))
    else:
        model = onnx.ModelProto()
        model.CopyFrom(graph.model)
    for tensor in model.graph.initializer:
        if tensor.name in graph.values:
            stored = helper.tensor_dtype_to_np_dtype(tensor.data_type)
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(graph.values[tensor.name]).astype(stored), tensor.name))
    return model, folder
