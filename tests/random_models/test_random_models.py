"""Random models: every valid model is rescaled exactly, or refused in one line with the reason.

`randmodels.generate(seed)` builds a valid ONNX model (MLP, 1-D/2-D CNN or a mixture, over every
op of README's Supported ops table, which is the rule registry `onnx_pathcond.ops.
supported_op_types()`, with barriers, fixed or dynamic batches, float16/32/64 and opsets 13-21).
Each model is written to a temporary folder and rescaled the way the command line does it
(in-process: `rescale_file(IN, OUT, **randmodels.seed_options(seed))`: one
seed in six with bn_statistics, another one in six with criterion="enorm"), and the outcome is
checked independently of the tool's own verification (`randmodels.check_seed`):

* written: OUT loads; the graph is the same (nodes, attributes, initializer names, dims, dtypes
  and storage, inputs, outputs, opsets); every weight element is multiplied by a positive finite
  factor (zeros stay zero, nothing under- or overflows its dtype); a BatchNormalization's running
  statistics are unchanged bit for bit without bn_statistics, and with it mean' = λ·mean and
  var' + ε = λ²·(var + ε) for one λ > 0 per channel, up to the rounding of the stored values;
  onnxruntime outputs of IN and OUT agree on seeded inputs (every batch 1-3 of a dynamic model)
  within 8x the model's own rounding noise (measured against a run in a wider dtype) or 8 units
  in the last place of the output's scale; the input file is unchanged;
* refused: a PathCondError with a one-line message, nothing at OUT nor next to it, the input
  unchanged; after a VerificationError the model is rescaled in memory without verification and
  checked as above: if it passes, the refusal was a false rejection (a failure);
* anything else (a traceback) is a crash (a failure).

PATHCOND_RANDOM_MODELS=N runs N models (default 600, in chunks of 20 seeds);
PATHCOND_RANDOM_START=S starts at seed S. A failing chunk names its seeds and how to reproduce
each one: `python tests/support/randmodels.py --check SEED` (or `python tests/support/randmodels.py SEED out.onnx`
to write the model). `python tests/support/randmodels.py --count 2000` prints a summary table.
"""

import os
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from support import randmodels
from onnx_pathcond.ops import supported_op_types

pytest.importorskip("onnxruntime")

COUNT = int(os.environ.get("PATHCOND_RANDOM_MODELS", "600"))
START = int(os.environ.get("PATHCOND_RANDOM_START", "0"))
CHUNK = 20
CHUNKS = [list(range(s, min(s + CHUNK, START + COUNT))) for s in range(START, START + COUNT, CHUNK)]
from support.repo import ROOT  # noqa: E402  (the repository, whatever the working directory)


def _report(outcome: randmodels.Outcome) -> str:
    lines = [f"seed {outcome.seed}: {outcome.kind} {outcome.reason}".rstrip()]
    lines += [f"  FAIL {kind}: {detail}" for kind, detail in outcome.failures]
    lines.append("  model: " + outcome.description.replace("\n", "\n  "))
    if outcome.kind == "crash":
        lines.append("  " + outcome.message.replace("\n", "\n  "))
    lines.append(f"  reproduce: python tests/support/randmodels.py --check {outcome.seed}   (or {outcome.reproducer()})")
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


def _ops_the_generator_must_make():
    """Every op with a rule (README's table is that registry: test_op_table.py), domain-qualified
    as `supported_op_types` names them, except an ONNX op whose schema is deprecated in every
    opset the generator writes (13-21): Upsample, deprecated since opset 10, found by its schema
    here rather than listed. Returns (required, left out)."""
    required, left_out = set(), set()
    for name in supported_op_types():
        domain, _, op = name.rpartition(".")
        if domain:  # another domain's op (com.microsoft): onnx has no schema for it
            required.add(name)
            continue
        schemas = []
        for version in range(13, 22):
            try:
                schemas.append(onnx.defs.get_schema(op, version))
            except onnx.defs.SchemaError:
                pass
        (required if any(not s.deprecated for s in schemas) else left_out).add(name)
    return required, left_out


def test_generator_covers_the_supported_ops():
    """Over the default run's seeds, every op with a rule (bar those the opsets 13-21 no longer
    have), the barrier forms of the newer rules, every family, dtype, batch kind and opset, and
    both options appear."""
    ops, families, dtypes, batches, opsets, options = set(), set(), set(), set(), set(), Counter()
    descriptions = []
    for seed in range(START, START + min(COUNT, 400)):
        model, desc = randmodels.generate(seed)
        ops |= {randmodels.op_name(n) for n in model.graph.node}
        head = desc.split("\n")[0]
        families.add(head.split(": ")[1].split(",")[0])
        dtypes.add(randmodels.model_dtype(model).name)
        batches.add("dynamic" if "dynamic" in head else "fixed")
        opsets.add(model.opset_import[0].version)
        for key, value in randmodels.seed_options(seed).items():
            options[f"{key}={value}"] += 1
            if key == "bn_statistics" and any(n.op_type == "BatchNormalization" for n in model.graph.node):
                options["bn_statistics with a BatchNormalization"] += 1
        descriptions.append(desc)
    required, left_out = _ops_the_generator_must_make()
    assert left_out <= {"Upsample"}, f"ops with a rule that opsets 13-21 lack: {sorted(left_out)}"
    if COUNT >= 300:
        assert required <= ops, f"no generated model has {sorted(required - ops)}"
        # weight storage, and barriers next to the supported forms
        assert {"Constant", "Cast", "Sigmoid", "Tanh", "Softmax", "Erf", "ConcatFromSequence"} <= ops
        # the forms of the newer rules (an op's presence alone could be its barrier form), and
        # their refused forms
        text = "\n".join(descriptions)
        for form in ("Clip min 0, no max", "Max with a constant 0", "(1x1 conv)", "channels last: Einsum",
                     "sequence axis", "sequence-chunks axis", "sequence-ones axis", "halves by sequence",
                     "channel shuffle", "shuffle unit", "\n  FusedConv2d", "\n  FusedConv1d",
                     "barrier Einsum", "barrier FusedConv", "read by ConcatFromSequence", "barrier Clip min"):
            assert form in text, form
        assert families == {"mlp", "cnn1d", "cnn2d", "mixture"}
        assert dtypes == {"float16", "float32", "float64"} and batches == {"dynamic", "fixed"}
        assert opsets == set(range(13, 22))
        n = min(COUNT, 400)
        for kind in ("bn_statistics=True", "criterion=enorm"):
            assert n / 12 <= options[kind] <= n / 3, (kind, options[kind])
        assert options["bn_statistics with a BatchNormalization"] >= n / 24, options


def _bn_seed(dtype):
    """A seed rescaled with bn_statistics whose model (of `dtype`) gets some running statistics
    rescaled, with its model and rescaled model."""
    import onnx_pathcond
    for seed in range(400):
        if not randmodels.seed_options(seed).get("bn_statistics"):
            continue
        model, _ = randmodels.generate(seed)
        if randmodels.model_dtype(model) != dtype or not randmodels.running_statistics(model):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            after, _ = onnx_pathcond.rescale(model, bn_statistics=True)
        probe = randmodels.Outcome(seed, "")
        randmodels.check_bn_statistics(model, after, probe, True)
        if probe.bn_statistics_rescaled and not probe.failures:
            return seed, model, after
    raise AssertionError(f"no {np.dtype(dtype).name} seed below 400 has BatchNorm statistics rescaled")


def _edited(model, name, change):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = randmodels.float_tensors(m)[name]
    t.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(t)), t.name))
    return m


def test_the_batchnorm_statistics_check_finds_a_wrong_variance():
    """The check of the running statistics (randmodels.check_bn_statistics) on a float32 model
    the tool rescaled with bn_statistics passes, and fails when the variance is written without
    ε (λ²·var), a few units in the last place further than rounding allows, or negative; and
    without bn_statistics any change to a mean or a variance fails."""
    seed, model, after = _bn_seed(np.float32)
    changed = [(node, mean, var) for node, mean, var in randmodels.running_statistics(model)
               if randmodels.float_tensors(model)[mean].SerializeToString()
               != randmodels.float_tensors(after)[mean].SerializeToString()]
    node, mean, var = changed[0]
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    before_var = numpy_helper.to_array(randmodels.float_tensors(model)[var]).astype(np.float64)

    def failures(rescaled, bn_statistics=True):
        probe = randmodels.Outcome(seed, "")
        randmodels.check_bn_statistics(model, rescaled, probe, bn_statistics)
        return [kind for kind, _ in probe.failures]

    def without_eps(new_var):  # λ²·var, λ² read off the rescaled variance itself
        lam2 = (new_var.astype(np.float64) + eps) / (before_var + eps)
        return (lam2 * before_var).astype(new_var.dtype)

    def four_ulps_up(new_var):  # the rounding of the mean and of the variance allow about 1.5
        for _ in range(4):
            new_var = np.nextafter(new_var, np.inf)
        return new_var

    for change in (without_eps, four_ulps_up, lambda v: -np.abs(v)):
        assert failures(_edited(after, var, change)), change
    assert not failures(after)
    assert "batchnorm statistics changed without bn_statistics" in failures(after, bn_statistics=False)


# ---------------------------------------------------------------------------- the command line
def _cli(in_path, out_path, options=None):
    """The command line on IN and OUT, with the flags of `options` (randmodels.seed_options)."""
    flags = []
    for key, value in (options or {}).items():
        if key == "bn_statistics" and value:
            flags.append("--bn-statistics")
        elif key == "criterion":
            flags += ["--criterion", str(value)]
        else:
            raise AssertionError(f"no flag for option {key}={value}")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "onnx_pathcond.cli", in_path, out_path, "-q"] + flags, cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


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


# 2 is rescaled with criterion="enorm", 5 and 103 with bn_statistics (103 has BatchNorm statistics
# rescaled); 977 was refused (exit code 3: float16 activations past the largest value) when this was written
CLI_SEEDS = [0, 1, 2, 3, 4, 5, 103, 977]


@pytest.mark.slow
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
        cases.append((f"seed{seed}", model, expected, randmodels.seed_options(seed)))
    float32 = next(m for m, _ in (randmodels.generate(s) for s in range(50))
                   if randmodels.model_dtype(m) == np.float32 and _with_nan(m) is not None)
    cases.append(("nan", _with_nan(float32), 1, {}))
    cases.append(("dynamic-feature", _with_dynamic_feature(randmodels.generate(1)[0]), 2, {}))
    problems = []
    for name, model, expected, options in cases:
        folder = tmp_path / name
        (folder / "out").mkdir(parents=True)
        in_path, out_path = str(folder / "in.onnx"), str(folder / "out" / "out.onnx")
        onnx.save_model(model, in_path)
        with open(in_path, "rb") as f:
            before = f.read()
        run = _cli(in_path, out_path, options)
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
