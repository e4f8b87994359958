"""Random models: every valid model is rescaled exactly, or refused in one line with the reason.

`randmodels.generate(seed)` builds a valid ONNX model (MLP, 1-D/2-D CNN or a mixture, over every
op of README's Supported ops table, with barriers, fixed or dynamic batches, float16/32/64 and
opsets 13-21). Each model is written to a temporary folder and rescaled the way the command line
does it (in-process: `rescale(IN, output=OUT, return_model=False)`), and the outcome is checked
independently of the tool's own verification (`randmodels.check_seed`):

* written: OUT loads; the graph is the same (nodes, attributes, initializer names, dims, dtypes
  and storage, inputs, outputs, opsets); every weight element is multiplied by a positive finite
  factor (zeros stay zero, nothing under- or overflows its dtype); onnxruntime outputs of IN and
  OUT agree on seeded inputs (every batch 1-3 of a dynamic model) within 8x the model's own
  rounding noise (measured against a run in a wider dtype) or 8 units in the last place of the
  output's scale; the input file is unchanged;
* refused: a PathCondError with a one-line message, nothing at OUT nor next to it, the input
  unchanged; after a VerificationError the model is rescaled in memory without verification and
  checked as above: if it passes, the refusal was a false rejection (a failure);
* anything else (a traceback) is a crash (a failure).

PATHCOND_RANDOM_MODELS=N runs N models (default 600, in chunks of 20 seeds);
PATHCOND_RANDOM_START=S starts at seed S. A failing chunk names its seeds and how to reproduce
each one: `python tests/randmodels.py --check SEED` (or `python tests/randmodels.py SEED out.onnx`
to write the model). `python tests/randmodels.py --count 2000` prints a summary table.
"""

import os
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import randmodels

pytest.importorskip("onnxruntime")

COUNT = int(os.environ.get("PATHCOND_RANDOM_MODELS", "600"))
START = int(os.environ.get("PATHCOND_RANDOM_START", "0"))
CHUNK = 20
CHUNKS = [list(range(s, min(s + CHUNK, START + COUNT))) for s in range(START, START + COUNT, CHUNK)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report(outcome: randmodels.Outcome) -> str:
    lines = [f"seed {outcome.seed}: {outcome.kind} {outcome.reason}".rstrip()]
    lines += [f"  FAIL {kind}: {detail}" for kind, detail in outcome.failures]
    lines.append("  model: " + outcome.description.replace("\n", "\n  "))
    if outcome.kind == "crash":
        lines.append("  " + outcome.message.replace("\n", "\n  "))
    lines.append(f"  reproduce: python tests/randmodels.py --check {outcome.seed}   (or {outcome.reproducer()})")
    return "\n".join(lines)


@pytest.mark.parametrize("seeds", CHUNKS, ids=[f"seeds{c[0]}-{c[-1]}" for c in CHUNKS])
def test_random_models_are_rescaled_exactly_or_refused_cleanly(seeds, tmp_path):
    outcomes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in seeds:
            outcomes.append(randmodels.check_seed(seed, str(tmp_path)))
    failed = [o for o in outcomes if o.failures]
    if failed:
        pytest.fail(f"{len(failed)} of {len(seeds)} models failed:\n" + "\n".join(_report(o) for o in failed),
                    pytrace=False)


def test_generator_is_deterministic_and_valid():
    for seed in (0, 1, 2, 3, 17):
        a, desc_a = randmodels.generate(seed)
        b, desc_b = randmodels.generate(seed)
        assert a.SerializeToString() == b.SerializeToString() and desc_a == desc_b
        onnx.checker.check_model(a, full_check=True)


def test_generator_covers_the_supported_ops():
    """Over the default run's seeds, every op of README's table (bar Upsample, which opsets 13-21
    no longer have) and every family, dtype and batch kind appear."""
    ops, families, dtypes, batches, opsets = set(), set(), set(), set(), set()
    for seed in range(START, START + min(COUNT, 400)):
        model, desc = randmodels.generate(seed)
        ops |= {n.op_type for n in model.graph.node}
        head = desc.split("\n")[0]
        families.add(head.split(": ")[1].split(",")[0])
        dtypes.add(randmodels.model_dtype(model).name)
        batches.add("dynamic" if "dynamic" in head else "fixed")
        opsets.add(model.opset_import[0].version)
    supported = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Relu", "LeakyRelu", "PRelu",
                 "Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
                 "ReduceSum", "ReduceMax", "Mul", "Div", "Add", "Sub", "Sum", "Max", "Min", "Flatten", "Reshape",
                 "Squeeze", "Unsqueeze", "Transpose", "Concat", "Split", "Slice", "Pad", "Tile", "Expand", "Gather",
                 "DepthToSpace", "SpaceToDepth", "Resize", "Constant", "Cast",
                 "Sigmoid", "Tanh", "Clip", "Softmax", "Erf"}
    if COUNT >= 300:
        assert supported <= ops, sorted(supported - ops)
        assert families == {"mlp", "cnn1d", "cnn2d", "mixture"}
        assert dtypes == {"float16", "float32", "float64"} and batches == {"dynamic", "fixed"}
        assert opsets == set(range(13, 22))


# ---------------------------------------------------------------------------- the command line
def _cli(in_path, out_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "onnx_pathcond.cli", in_path, out_path, "-q"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _with_nan(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2:
            a = numpy_helper.to_array(t).copy()
            a.flat[0] = np.nan
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            return m
    return None


def _with_dynamic_feature(model):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[len(dims) - 1].dim_param = "L"
    return m


CLI_SEEDS = [0, 1, 2, 3, 4, 5, 15, 353]  # 15 and 353 were refused (exit code 3) when this was written


def test_command_line_exit_codes_and_one_line_errors(tmp_path):
    """The command line on generated models: exit code 0 with OUT written, or 1/2/3 with one
    `error:` line on stderr, nothing at OUT and no traceback; the same outcome as in-process.
    Also a generated model with a NaN weight (exit 1) and one whose feature dimension is made
    dynamic (exit 2: it needs --input-shape)."""
    cases = []
    for seed in CLI_SEEDS:
        model, _ = randmodels.generate(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = randmodels.check_seed(seed, str(tmp_path / "inproc")).exit_code
        cases.append((f"seed{seed}", model, expected))
    float32 = next(m for m, _ in (randmodels.generate(s) for s in range(50))
                   if randmodels.model_dtype(m) == np.float32 and _with_nan(m) is not None)
    cases.append(("nan", _with_nan(float32), 1))
    cases.append(("dynamic-feature", _with_dynamic_feature(randmodels.generate(1)[0]), 2))
    problems = []
    for name, model, expected in cases:
        folder = tmp_path / name
        (folder / "out").mkdir(parents=True)
        in_path, out_path = str(folder / "in.onnx"), str(folder / "out" / "out.onnx")
        onnx.save_model(model, in_path)
        with open(in_path, "rb") as f:
            before = f.read()
        run = _cli(in_path, out_path)
        err_lines = [line for line in run.stderr.splitlines() if line.strip()]
        errors = [line for line in err_lines if line.startswith("error:")]
        with open(in_path, "rb") as f:
            if f.read() != before:
                problems.append(f"{name}: the input file changed")
        if "Traceback" in run.stderr or "Traceback" in run.stdout:
            problems.append(f"{name}: traceback:\n{run.stderr[-2000:]}")
        if run.returncode not in (0, 1, 2, 3):
            problems.append(f"{name}: exit code {run.returncode}")
        if expected is not None and run.returncode != expected:
            problems.append(f"{name}: exit code {run.returncode}, in-process outcome says {expected}: "
                            f"{run.stderr.strip()[:300]}")
        if run.returncode == 0:
            if not os.path.exists(out_path):
                problems.append(f"{name}: exit 0 and no OUT")
            if errors:
                problems.append(f"{name}: exit 0 with {errors}")
        else:
            if len(errors) != 1:
                problems.append(f"{name}: exit {run.returncode}, stderr is not one error: line: {run.stderr[-500:]!r}")
            left = os.listdir(folder / "out")
            if left:
                problems.append(f"{name}: exit {run.returncode} and files left next to OUT: {left}")
    assert not problems, "\n".join(problems)
