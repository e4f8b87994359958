"""Running two models on the same random inputs and comparing their outputs with onnxruntime,
for every test that checks a rescaled model against its input."""

import numpy as np
import onnxruntime as ort


def run(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(model, seed, batch=None):
    rng = np.random.default_rng(seed)
    feeds = {}
    # below IR version 4 every initializer is listed as an input, and onnxruntime refuses feeds for them
    fixed = {t.name for t in model.graph.initializer} if model.ir_version < 4 else set()
    for vi in model.graph.input:
        if vi.name in fixed:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (batch or 3) for d in vi.type.tensor_type.shape.dim]
        if batch and dims:
            dims[0] = batch if not vi.type.tensor_type.shape.dim[0].HasField("dim_value") else dims[0]
        feeds[vi.name] = (rng.standard_normal(dims) * 2).astype(np.float32)
    return feeds


def assert_equivalent(before, after, seed=123, rtol=1e-5):
    feeds = random_feeds(before, seed)
    for a, b in zip(run(before, feeds), run(after, feeds)):
        scale = np.abs(a).max()
        assert np.abs(a - b).max() <= rtol * max(scale, 1e-30), (np.abs(a - b).max(), scale)


def weight_rounding_noise(model, seed=123, trials=5):
    """How far the model's outputs move, relative to their scale, when every float32 weight
    moves by one unit in the last place (a random sign per element): the floor below which
    no rewrite of its weights can stay (a deep network amplifies its own rounding)."""
    import copy

    import onnx

    feeds = random_feeds(model, seed)
    reference = run(model, feeds)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for _ in range(trials):
        moved = copy.deepcopy(model)
        for t in moved.graph.initializer:
            value = onnx.numpy_helper.to_array(t)
            if value.dtype == np.float32:
                value = value * (1 + rng.choice([-1.0, 1.0], value.shape) * 2.0 ** -24)
                t.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32), t.name))
        for a, b in zip(reference, run(moved, feeds)):
            worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)))
    return worst
