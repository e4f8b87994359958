"""The command line: every option, every documented error, and the file it writes.

Most tests drive `onnx_pathcond.cli.main` through click's `CliRunner`; two run the real
console script (or `python -m onnx_pathcond.cli`) as a subprocess.

The contract under test (see `onnx-pathcond --help`):
exit 0 written or dry run; 1 the model cannot be processed; 2 bad command line or input
file; 3 the equivalence check failed. An error is ONE line on stderr starting with
`error: `, nothing is written at OUT (no partial file, no temporary file left beside it),
and the input file is never modified.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
import traceback
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from support.nets import Net, mlp
import onnx_pathcond
from onnx_pathcond import options
from support import repo

from support.repo import ROOT  # noqa: E402  (the repository, whatever the working directory)
MODELS = ROOT / "models"
MLP = MODELS / "mlp.onnx"  # Gemm-ReLU-Gemm-ReLU-Gemm, 784-512-256-10
CNN = MODELS / "cnn.onnx"  # Conv-ReLU-MaxPool x2, Flatten, Gemm-ReLU-Gemm
RELU6 = MODELS / "mobilenet_relu6.legacy_bn.onnx"  # every group frozen by Clip (ReLU6) or BN


# ---------------------------------------------------------------------------- helpers
def describe(result) -> str:
    text = f"exit code {result.exit_code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += "\n--- exception\n" + "".join(traceback.format_exception(*result.exc_info))
    return text


@pytest.fixture
def cli(invoke_cli):
    """`cli(*args, code=0)` invokes the command in process (conftest's `invoke_cli`) and checks
    the exit code (unless `code` is None)."""
    def run(*args, code=0):
        result = invoke_cli(*args)
        if code is not None:
            assert result.exit_code == code, describe(result)
        return result
    return run


def assert_one_error_line(result, *fragments) -> str:
    """stderr is exactly one line `error: ...` containing every fragment; stdout is empty."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, describe(result)
    line = lines[0]
    assert line.startswith("error: "), describe(result)
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}"
    assert result.stdout == "", describe(result)
    return line


class Workspace:
    """A folder holding a copy of the input; remembers its state to prove what changed."""

    def __init__(self, folder: Path, source, name: str = "in.onnx"):
        self.dir = folder
        self.input = folder / name
        if isinstance(source, onnx.ModelProto):
            onnx.save(source, str(self.input))
        elif isinstance(source, bytes):
            self.input.write_bytes(source)
        else:
            shutil.copyfile(source, self.input)
        self.out = folder / "out.onnx"
        self.report = folder / "report.json"
        self.input_bytes = self.input.read_bytes()
        self.input_mtime = self.input.stat().st_mtime_ns
        self.listing = self.files()

    def files(self):
        return sorted(os.listdir(self.dir))  # hidden temporary files included

    def assert_input_untouched(self):
        assert self.input.read_bytes() == self.input_bytes, "the input file was modified"
        assert self.input.stat().st_mtime_ns == self.input_mtime, "the input file's mtime changed"

    def assert_nothing_written(self):
        self.assert_input_untouched()
        assert self.files() == self.listing, f"files appeared: {sorted(set(self.files()) - set(self.listing))}"

    def assert_only_new(self, *names):
        """Exactly these files appeared (so no temporary file was left behind)."""
        self.assert_input_untouched()
        assert self.files() == sorted(self.listing + list(names))

    def load_report(self) -> dict:
        return json.loads(self.report.read_text())


def params(model: onnx.ModelProto) -> dict:
    """Every stored value: initializers and the outputs of Constant nodes, by name."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def assert_same_structure(before: onnx.ModelProto, after: onnx.ModelProto):
    """Only values may change: names, shapes, dtypes, node order, opsets, metadata are kept."""
    assert after.ir_version == before.ir_version
    assert [(o.domain, o.version) for o in after.opset_import] == [(o.domain, o.version) for o in before.opset_import]
    assert (after.producer_name, after.producer_version) == (before.producer_name, before.producer_version)
    assert after.doc_string == before.doc_string
    assert [(p.key, p.value) for p in after.metadata_props] == [(p.key, p.value) for p in before.metadata_props]
    g0, g1 = before.graph, after.graph
    assert g1.name == g0.name
    assert [vi.SerializeToString() for vi in g1.input] == [vi.SerializeToString() for vi in g0.input]
    assert [vi.SerializeToString() for vi in g1.output] == [vi.SerializeToString() for vi in g0.output]
    assert [(n.op_type, n.name, n.domain, list(n.input), list(n.output)) for n in g1.node] == \
           [(n.op_type, n.name, n.domain, list(n.input), list(n.output)) for n in g0.node]
    for n0, n1 in zip(g0.node, g1.node):
        assert [a.name for a in n1.attribute] == [a.name for a in n0.attribute]
        if n0.op_type != "Constant":  # a Constant's value may be a rescaled weight
            assert [a.SerializeToString() for a in n1.attribute] == [a.SerializeToString() for a in n0.attribute]
    assert [(t.name, list(t.dims), t.data_type) for t in g1.initializer] == \
           [(t.name, list(t.dims), t.data_type) for t in g0.initializer]
    p0, p1 = params(before), params(after)
    assert list(p1) == list(p0)
    for name in p0:
        assert p1[name].dtype == p0[name].dtype and p1[name].shape == p0[name].shape, name


def run_ort(model: onnx.ModelProto, feeds: dict):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(model: onnx.ModelProto, shapes=None, seed=1234) -> dict:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if shapes and vi.name in shapes:
            shape = shapes[vi.name]
        else:
            shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            assert all(d > 0 for d in shape), f"give a shape for the dynamic input {vi.name}"
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def assert_same_function(before: onnx.ModelProto, after: onnx.ModelProto, shapes=None, rtol=1e-5):
    feeds = random_feeds(before, shapes)
    for a, b in zip(run_ort(before, feeds), run_ort(after, feeds)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.all(np.isfinite(b))
        scale = max(float(np.abs(a).max()), 1e-30)
        assert float(np.abs(a - b).max()) <= rtol * scale


def assert_valid_output(ws: Workspace, shapes=None):
    """OUT loads, passes onnx.checker, keeps the structure and computes the same function."""
    before = onnx.load(str(ws.input))
    after = onnx.load(str(ws.out))
    onnx.checker.check_model(after)
    assert_same_structure(before, after)
    assert_same_function(before, after, shapes)
    return before, after


def weights_changed(before: onnx.ModelProto, after: onnx.ModelProto) -> bool:
    p0, p1 = params(before), params(after)
    return any(not np.array_equal(p0[k], p1[k]) for k in p0 if p0[k].dtype.kind == "f")


# ---------------------------------------------------------------------------- small models
def small_mlp() -> onnx.ModelProto:
    return mlp([6, 8, 8, 3], seed=1)


def dynamic_cnn() -> onnx.ModelProto:
    """Conv-ReLU-Conv on an input of shape ['N', 3, 'H', 'W']."""
    net = Net(["N", 3, "H", "W"], seed=2)
    x = net.relu(net.conv(net.x, 3, 4, 3, pad=1))
    return net.model(net.conv(x, 4, 2, 1))


def undefined_input_model() -> onnx.ModelProto:
    """Fails onnx.checker: the first node reads a tensor nothing defines."""
    model = small_mlp()
    model.graph.node[0].input[0] = "undefined_tensor"
    return model


def with_bad_value(index: int, value: float):
    """small_mlp with one element of initializer `index` set to `value`; returns (model, its name)."""
    model = small_mlp()
    tensor = model.graph.initializer[index]
    array = numpy_helper.to_array(tensor).copy()
    array.flat[1] = value
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return model, tensor.name


def zero_hidden_layer() -> onnx.ModelProto:
    """A 4-5-6-3 ReLU MLP whose middle layer (weight and bias) is all zeros."""
    model = mlp([4, 5, 6, 3], seed=3)
    for tensor in model.graph.initializer[2:4]:
        tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(tensor)), tensor.name))
    return model


def one_gemm() -> onnx.ModelProto:
    """A single Gemm: its only channels reach the graph output, so nothing is rescalable."""
    return mlp([4, 3], seed=4)


# ---------------------------------------------------------------------------- the default run
@pytest.mark.parametrize("source", [small_mlp, CNN, MODELS / "helper_mlp.onnx", MODELS / "mobilenet.legacy_bn.onnx"],
                         ids=["small_mlp", "cnn", "helper_mlp", "mobilenet_bn"])
def test_default_run_writes_an_equivalent_model(tmp_path, source, cli):
    ws = Workspace(tmp_path, source() if callable(source) else source)
    result = cli(ws.input, ws.out, "--report", ws.report)
    assert "equivalent" in result.stdout
    assert result.stderr == ""
    ws.assert_only_new("out.onnx", "report.json")
    before, after = assert_valid_output(ws)
    report = ws.load_report()
    assert report["groups"]["rescalable"] > 0
    assert report["verification"]["passed"] is True
    assert weights_changed(before, after), "the tool found groups but changed no weight"


def test_summary_names_the_files_and_the_steps(tmp_path, cli):
    ws = Workspace(tmp_path, MLP)
    out = cli(ws.input, ws.out).stdout
    assert out.splitlines()[0] == f"onnx-pathcond: {ws.input} -> {ws.out}"
    for word in ("model", "groups", "768 rescalable", "diag(G)", "AM/GM", "solver", "coordinate-descent",
                 "check", "equivalent", "time"):
        assert word in out


def test_version_and_help(cli):
    assert cli("--version").stdout.strip().endswith(onnx_pathcond.__version__)
    out = cli("-h").stdout
    for option in ("--input-shape", "--solver", "--max-iter", "--tol", "--verify", "--rtol", "--seed", "--report",
                   "--dry-run", "--overwrite", "--quiet", "--verbose", "Exit codes"):
        assert option in out


# ---------------------------------------------------------------------------- --input-shape
def test_dynamic_dimension_without_input_shape_is_refused(tmp_path, cli):
    ws = Workspace(tmp_path, dynamic_cnn())
    result = cli(ws.input, ws.out, code=2)
    line = assert_one_error_line(result, "'x'", "--input-shape")
    assert "'H'" in line or "axis 2" in line, line  # names the dimension
    ws.assert_nothing_written()


def test_dynamic_dimension_with_input_shape(tmp_path, cli):
    ws = Workspace(tmp_path, dynamic_cnn())
    cli(ws.input, ws.out, "--input-shape", "x:1x3x8x8", "--report", ws.report, "-q")
    ws.assert_only_new("out.onnx", "report.json")
    before, after = assert_valid_output(ws, shapes={"x": (1, 3, 8, 8)})
    # the output keeps the symbolic input; and it is the same function at any other size too
    assert [d.dim_param or d.dim_value for d in after.graph.input[0].type.tensor_type.shape.dim] == ["N", 3, "H", "W"]
    assert_same_function(before, after, shapes={"x": (2, 3, 5, 7)})
    report = ws.load_report()
    assert report["verification"]["input_shapes"]["x"][1:] == [3, 8, 8]
    assert report["groups"]["rescalable"] == 4


def test_dry_run_needs_input_shape_too(tmp_path, cli):
    ws = Workspace(tmp_path, dynamic_cnn())
    assert_one_error_line(cli(ws.input, "--dry-run", code=2), "--input-shape")
    assert "4 groups" in cli(ws.input, "--dry-run", "--input-shape", "x:1x3x8x8").stdout
    ws.assert_nothing_written()


@pytest.mark.parametrize("spec, fragment", [
    ("zz:1x3x8x8", "'zz'"),           # not an input of the model
    ("x1x3x8x8", "x1x3x8x8"),         # no NAME:
    (":1x3x8x8", ":1x3x8x8"),         # empty name
    ("x:", "x:"),                     # no dimensions
    ("x:1x3xHx8", "x:1x3xhx8"),       # not an integer
    ("x:1x3x0x8", "x:1x3x0x8"),       # not positive
    ("x:1x3x8", "dimensions"),        # wrong rank
    ("x:1x4x8x8", "axis 1"),          # contradicts the static channel count
])
def test_bad_input_shape_is_refused(tmp_path, spec, fragment, cli):
    ws = Workspace(tmp_path, dynamic_cnn())
    assert_one_error_line(cli(ws.input, ws.out, "--input-shape", spec, code=2), "--input-shape", fragment)
    ws.assert_nothing_written()


# ---------------------------------------------------------------------------- --verify / --rtol / --seed
def test_no_verify_says_the_check_was_skipped(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    out = cli(ws.input, ws.out, "--no-verify", "--report", ws.report).stdout
    assert "skipped" in out and "equivalent" not in out
    report = ws.load_report()
    assert report["verification"] is None
    assert "verify" not in report["timings"]
    assert_valid_output(ws)  # still equivalent, just not checked by the tool


def test_tiny_rtol_fails_the_check_and_writes_nothing(tmp_path, cli):
    ws = Workspace(tmp_path, MLP)
    result = cli(ws.input, ws.out, "--rtol", "1e-30", code=3)
    assert_one_error_line(result, "difference", "rtol")
    ws.assert_nothing_written()


def test_rtol_and_seed_reach_the_report(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    cli(ws.input, ws.out, "--report", ws.report, "-q")
    default = ws.load_report()["verification"]
    assert default["seed"] == 0 and default["rtol"] == pytest.approx(1e-5)
    cli(ws.input, ws.out, "--report", ws.report, "--rtol", "1e-3", "--seed", "123", "-q")
    verification = ws.load_report()["verification"]
    assert verification["seed"] == 123
    assert verification["rtol"] == pytest.approx(1e-3)
    assert verification["passed"] is True


def test_rtol_must_be_a_non_negative_number(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    cli(ws.input, ws.out, "--rtol", "-1", code=2)
    cli(ws.input, ws.out, "--rtol", "abc", code=2)
    ws.assert_nothing_written()


# ---------------------------------------------------------------------------- --report
def test_report_is_complete_json(tmp_path, cli):
    ws = Workspace(tmp_path, MLP)
    cli(ws.input, ws.out, "--report", ws.report, "-q")
    report = ws.load_report()
    for key in ("groups", "layers", "frozen", "criterion", "solver", "rewritten", "verification", "timings"):
        assert key in report, key
    c = report["criterion"]
    for key in ("am_gm_before", "am_gm_after", "F_before", "F_after", "max_before", "min_before", "max_after",
                "min_after"):
        assert isinstance(c[key], float), key
    assert c["F_after"] <= c["F_before"]
    assert c["am_gm_after"] <= c["am_gm_before"]
    assert 1.0 <= c["am_gm_after"]  # AM >= GM
    assert 0 < c["min_before"] <= c["max_before"] and 0 < c["min_after"] <= c["max_after"]
    assert report["groups"]["rescalable"] == 768  # the two hidden layers, 512 + 256
    assert [row["groups"] for row in report["layers"]] == [512, 256]
    assert report["solver"]["method"] == "coordinate-descent"
    assert 1 <= report["solver"]["sweeps"] <= 10
    assert report["solver"]["F_after"] == c["F_after"]
    assert {r["name"] for r in report["rewritten"]} <= set(params(onnx.load(str(ws.input))))
    assert report["verification"]["passed"] is True and report["verification"]["max_rel"] <= 1e-5
    assert {"load", "analyse", "statistics", "solve", "rewrite", "verify", "save"} <= set(report["timings"])
    assert all(t >= 0 for t in report["timings"].values())
    assert report["output"] == str(ws.out)


def test_report_in_missing_directory_is_refused(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    assert_one_error_line(cli(ws.input, ws.out, "--report", tmp_path / "nope" / "r.json", code=2), "nope")
    ws.assert_nothing_written()


def test_report_path_equal_to_input_is_refused(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    result = cli(ws.input, ws.out, "--report", ws.input, "-q", code=None)
    ws.assert_input_untouched()
    assert result.exit_code == 2, describe(result)


def test_report_path_equal_to_output_is_refused(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    result = cli(ws.input, ws.out, "--report", ws.out, "-q", code=2)
    assert_one_error_line(result, "--report", "the output model")
    ws.assert_nothing_written()


# ---------------------------------------------------------------------------- --dry-run
def test_dry_run_without_out_prints_the_groups(tmp_path, cli):
    ws = Workspace(tmp_path, CNN)
    result = cli(ws.input, "--dry-run")
    out = result.stdout
    assert "56 rescalable" in out and "frozen" in out
    layers = [line for line in out.splitlines() if line.strip().startswith("layer")]
    assert len(layers) == 3, out  # conv 8, conv 16, hidden Gemm 32
    assert ["8 groups" in layers[0], "16 groups" in layers[1], "32 groups" in layers[2]] == [True] * 3
    steps = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert "solver" not in steps and "check" not in steps  # nothing was solved or checked
    ws.assert_nothing_written()


def test_dry_run_with_out_writes_nothing(tmp_path, cli):
    ws = Workspace(tmp_path, CNN)
    cli(ws.input, ws.out, "--dry-run")
    cli(ws.input, tmp_path / "missing" / "out.onnx", "--dry-run")
    ws.assert_nothing_written()


# ---------------------------------------------------------------------------- --max-iter / --tol / --solver
@pytest.mark.parametrize("sweeps", [1, 3])
def test_max_iter_with_zero_tol_runs_that_many_sweeps(tmp_path, sweeps, cli):
    ws = Workspace(tmp_path, MLP)
    cli(ws.input, ws.out, "--max-iter", sweeps, "--tol", "0", "--report", ws.report, "-q")
    solver = ws.load_report()["solver"]
    assert solver["sweeps"] == sweeps
    assert solver["max_iter"] == sweeps and solver["tol"] == 0
    assert len(solver["F_history"]) == sweeps


def test_large_tol_stops_after_one_sweep(tmp_path, cli):
    ws = Workspace(tmp_path, MLP)
    cli(ws.input, ws.out, "--tol", "1e9", "--report", ws.report, "-q")
    solver = ws.load_report()["solver"]
    assert solver["sweeps"] == 1 and solver["converged"] is True


def test_max_iter_zero_leaves_weights_unchanged(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    cli(ws.input, ws.out, "--max-iter", "0", "--report", ws.report, "-q")
    before, after = assert_valid_output(ws)
    assert not weights_changed(before, after)
    assert ws.load_report()["solver"]["sweeps"] == 0


def test_negative_max_iter_and_tol_are_refused(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    cli(ws.input, ws.out, "--max-iter", "-1", code=2)
    cli(ws.input, ws.out, "--tol", "-1", code=2)
    cli(ws.input, ws.out, "--solver", "newton", code=2)
    ws.assert_nothing_written()


@pytest.mark.parametrize("args", [["--max-iter", "-1"], ["--solver", "newton"], ["--no-such-option"]],
                         ids=["max-iter", "solver", "unknown-option"])
def test_usage_errors_are_one_error_line(tmp_path, args, cli):
    ws = Workspace(tmp_path, small_mlp())
    assert_one_error_line(cli(ws.input, ws.out, *args, code=2))


def test_exact_solver(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    cli(ws.input, ws.out, "--report", ws.report, "-q")
    cd = ws.load_report()["criterion"]
    cli(ws.input, ws.out, "--solver", "exact", "--report", ws.report, "-q")
    report = ws.load_report()
    assert report["solver"]["method"] != "coordinate-descent"
    assert report["criterion"]["F_after"] <= cd["F_after"] + 1e-9 * abs(cd["F_after"])
    assert_valid_output(ws)


@pytest.mark.parametrize("solver, documented", [("cd", (10, 1e-2)), ("exact", (1000, 1e-6))])
def test_api_and_command_line_take_the_same_solver_defaults(tmp_path, solver, documented, cli):
    ws = Workspace(tmp_path, small_mlp())
    cli(ws.input, ws.out, "--solver", solver, "--report", ws.report, "-q")
    from_cli = ws.load_report()["solver"]
    _, report = onnx_pathcond.rescale(str(ws.input), solver=solver)
    assert (from_cli["max_iter"], from_cli["tol"]) == (report.solver.max_iter, report.solver.tol) == documented
    assert (options.SOLVERS[solver].max_iter, options.SOLVERS[solver].tol) == documented


def test_help_shows_each_solvers_defaults(cli):
    text = " ".join(cli("--help").stdout.split())
    assert "Sweeps of coordinate descent (default 10) or iterations of the exact solver (default 1000)" in text
    assert "(cd, default 1e-2)" in text and "(exact, default 1e-6)" in text
    assert ("(default: 1e-5 for a model computing in float32, 1e-2 in float16, raised to 10 times the model's own "
            "rounding noise when that is larger, at most 0.1)") in text


def test_exact_solver_from_the_api_converges_with_its_defaults():
    _, report = onnx_pathcond.rescale(str(MLP), solver="exact")
    assert report.solver.converged is True
    assert report.solver.max_iter == 1000 and report.solver.sweeps < 1000


# ---------------------------------------------------------------------------- -q / -v
def test_quiet_prints_nothing_on_success(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    result = cli(ws.input, ws.out, "-q")
    assert result.stdout == "" and result.stderr == ""
    ws.assert_only_new("out.onnx")


def test_verbose_prints_one_line_per_layer(tmp_path, cli):
    ws = Workspace(tmp_path, MLP)
    plain = cli(ws.input, ws.out).stdout
    assert not [line for line in plain.splitlines() if line.strip().startswith("layer")]
    verbose = cli(ws.input, ws.out, "-v", "--report", ws.report).stdout
    layers = [line for line in verbose.splitlines() if line.strip().startswith("layer")]
    rows = ws.load_report()["layers"]
    assert len(layers) == len(rows) == 2
    for line, row in zip(layers, rows):
        assert row["tensor"] in line and f"{row['groups']} groups" in line and "lambda" in line


# ---------------------------------------------------------------------------- --overwrite
@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink"])
def test_output_equal_to_input_needs_overwrite(tmp_path, spelling, cli):
    ws = Workspace(tmp_path, small_mlp())
    out = {"same": ws.input, "dotted": tmp_path / "." / "in.onnx", "symlink": tmp_path / "link.onnx"}[spelling]
    if spelling == "symlink":
        out.symlink_to(ws.input)
        ws.listing = ws.files()
    assert_one_error_line(cli(ws.input, out, code=2), "--overwrite")
    ws.assert_nothing_written()


def test_overwrite_replaces_the_input_atomically(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    original = onnx.load(str(ws.input))
    inode = ws.input.stat().st_ino
    cli(ws.input, ws.input, "--overwrite", "-q")
    assert ws.files() == ws.listing  # no temporary file left
    assert ws.input.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    rescaled = onnx.load(str(ws.input))
    onnx.checker.check_model(rescaled)
    assert_same_structure(original, rescaled)
    assert_same_function(original, rescaled)
    assert weights_changed(original, rescaled)


def test_existing_output_is_replaced(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    ws.out.write_bytes(b"old content")
    ws.listing = ws.files()
    cli(ws.input, ws.out, "-q")
    assert ws.files() == ws.listing
    assert_valid_output(ws)


def test_output_file_mode_follows_the_umask(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    umask = os.umask(0o022)
    try:
        cli(ws.input, ws.out, "-q")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(ws.out.stat().st_mode) == 0o644


def test_overwrite_keeps_the_file_mode(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    ws.input.chmod(0o644)
    cli(ws.input, ws.input, "--overwrite", "-q")
    assert stat.S_IMODE(ws.input.stat().st_mode) == 0o644


# ---------------------------------------------------------------------------- bad input files
def test_missing_input(tmp_path, cli):
    result = cli(tmp_path / "nope.onnx", tmp_path / "out.onnx", code=2)
    assert_one_error_line(result, "nope.onnx")
    assert os.listdir(tmp_path) == []


def test_directory_as_input(tmp_path, cli):
    (tmp_path / "dir.onnx").mkdir()
    assert_one_error_line(cli(tmp_path / "dir.onnx", tmp_path / "out.onnx", code=2), "dir.onnx", "directory")
    assert os.listdir(tmp_path) == ["dir.onnx"]


@pytest.mark.parametrize("content", [
    np.random.default_rng(0).bytes(4096),
    b"hello world\n",
    b'{"graph": {"node": []}}\n',
    b'ir_version: 8\ngraph { name: "g" }\n',  # ONNX text format is not an ONNX file either
    b"",
], ids=["random-bytes", "text", "json", "textproto", "empty"])
def test_not_an_onnx_file(tmp_path, content, cli):
    ws = Workspace(tmp_path, content)
    assert_one_error_line(cli(ws.input, ws.out, code=2), "in.onnx", "not an ONNX model")
    ws.assert_nothing_written()


def test_model_failing_the_checker(tmp_path, cli):
    ws = Workspace(tmp_path, undefined_input_model())
    assert_one_error_line(cli(ws.input, ws.out, code=1), "checker", "undefined_tensor")
    ws.assert_nothing_written()


def test_output_in_missing_directory(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    assert_one_error_line(cli(ws.input, tmp_path / "nope" / "out.onnx", code=2), "nope")
    ws.assert_nothing_written()


def test_output_is_a_directory(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    (tmp_path / "sub").mkdir()
    ws.listing = ws.files()
    assert_one_error_line(cli(ws.input, tmp_path / "sub", code=2), "directory")
    ws.assert_nothing_written()
    assert os.listdir(tmp_path / "sub") == []


def test_missing_out_without_dry_run(tmp_path, cli):
    ws = Workspace(tmp_path, small_mlp())
    assert_one_error_line(cli(ws.input, code=2), "OUT", "--dry-run")
    ws.assert_nothing_written()


@pytest.mark.parametrize("index, value", [(0, np.nan), (2, np.inf), (5, -np.inf)], ids=["nan", "inf", "-inf"])
def test_non_finite_weight(tmp_path, index, value, cli):
    model, name = with_bad_value(index, value)
    ws = Workspace(tmp_path, model)
    assert_one_error_line(cli(ws.input, ws.out, code=1), f"'{name}'")
    ws.assert_nothing_written()


@pytest.mark.parametrize("dtype, huge", [(np.float64, 1e308), (np.float32, 3e38)], ids=["float64", "float32"])
def test_huge_finite_weights_are_not_called_infinite(dtype, huge):
    # Their sum overflows to inf in the dtype it is taken in: the check must then look at the
    # elements themselves.
    from support.nets import mlp
    from onnx_pathcond import api, plan
    from onnx_pathcond.errors import ModelError

    model = mlp([3, 4, 2], seed=2, dtype=dtype)
    first = model.graph.initializer[0]
    shape = numpy_helper.to_array(first).shape
    first.CopyFrom(numpy_helper.from_array(np.full(shape, huge, dtype=dtype), first.name))
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.full(shape, huge, dtype=dtype).sum())  # (float16 sums in float32: never)
    graph, analysis, _ = api.analyse_model(model)
    plan.check_finite(graph, analysis)  # no error
    first.CopyFrom(numpy_helper.from_array(np.array([[huge] * 3, [huge] * 3, [np.nan] * 3, [1.0] * 3], dtype=dtype),
                                           first.name))
    graph, analysis, _ = api.analyse_model(model)
    with pytest.raises(ModelError, match=first.name):
        plan.check_finite(graph, analysis)


def test_all_zero_hidden_layer(tmp_path, cli):
    ws = Workspace(tmp_path, zero_hidden_layer())
    cli(ws.input, ws.out, "--report", ws.report, "-q")
    ws.assert_only_new("out.onnx", "report.json")
    before, after = assert_valid_output(ws)
    for name, value in params(after).items():
        assert np.all(np.isfinite(value)), name
    assert ws.load_report()["verification"]["passed"] is True


# ---------------------------------------------------------------------------- nothing to rescale
@pytest.mark.parametrize("source, category, reason", [
    (RELU6, "barrier", "Clip"),
    (one_gemm, "graph_output", "graph output"),
], ids=["relu6", "one-gemm"])
@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "normal"])
def test_no_rescalable_group(tmp_path, source, category, reason, quiet, cli):
    ws = Workspace(tmp_path, source() if callable(source) else source)
    result = cli(ws.input, ws.out, "--report", ws.report, *(["-q"] if quiet else []))
    warning = [line for line in (result.stdout + result.stderr).splitlines() if "warning" in line]
    assert len(warning) == 1 and "no rescalable group" in warning[0], describe(result)
    if quiet:
        assert result.stdout == "" and result.stderr.startswith("warning: ")
    ws.assert_only_new("out.onnx", "report.json")
    before, after = assert_valid_output(ws)
    assert not weights_changed(before, after)
    report = ws.load_report()
    assert report["groups"]["rescalable"] == 0
    assert report["warnings"] and "no rescalable group" in report["warnings"][0]
    assert report["frozen"] and all(row["reason"] for row in report["frozen"])
    assert any(row["category"] == category and reason in row["reason"] for row in report["frozen"]), report["frozen"]


# ---------------------------------------------------------------------------- failures while saving
def _failing_save(monkeypatch, folder: Path):
    """Writing the model file under `folder` writes half of it, then fails as on a full disk."""
    from onnx_pathcond import protoio

    def write_model(model, f, **kwargs):
        if folder.resolve() in Path(f.name).resolve().parents:
            f.write(model.SerializeToString()[:100])
            raise OSError(errno.ENOSPC, "No space left on device", f.name)
        return real(model, f, **kwargs)

    real = protoio.write_model
    monkeypatch.setattr(protoio, "write_model", write_model)


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch, cli):
    ws = Workspace(tmp_path, small_mlp())
    _failing_save(monkeypatch, tmp_path)
    result = cli(ws.input, ws.out, code=None)
    assert result.exit_code != 0, describe(result)
    ws.assert_nothing_written()


def test_failed_save_over_the_input_keeps_the_input(tmp_path, monkeypatch, cli):
    ws = Workspace(tmp_path, small_mlp())
    _failing_save(monkeypatch, tmp_path)
    result = cli(ws.input, ws.input, "--overwrite", code=None)
    assert result.exit_code != 0, describe(result)
    ws.assert_nothing_written()


def test_failed_save_is_one_error_line(tmp_path, monkeypatch, cli):
    ws = Workspace(tmp_path, small_mlp())
    _failing_save(monkeypatch, tmp_path)
    result = cli(ws.input, ws.out, code=None)
    assert result.exit_code == 1, describe(result)  # SaveError
    assert_one_error_line(result, "out.onnx", "No space left on device")


# ---------------------------------------------------------------------------- external data
def test_external_data_stays_external(tmp_path, cli):
    model = onnx.load(str(CNN))
    source = tmp_path / "src"
    source.mkdir()
    onnx.save(model, str(source / "in.onnx"), save_as_external_data=True, location="in.data", size_threshold=0)
    data_before = (source / "in.data").read_bytes()
    cli(source / "in.onnx", source / "out.onnx", "-q")
    assert (source / "in.data").read_bytes() == data_before  # the input's weights are untouched
    out = onnx.load(str(source / "out.onnx"), load_external_data=False)
    big = [t for t in out.graph.initializer if np.prod(t.dims) > 16]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)


def _external_input(folder: Path, location: str) -> Workspace:
    """A Workspace whose input 'in.onnx' keeps its weights in `location` (next to it)."""
    ws = Workspace(folder, small_mlp())
    onnx.save(onnx.load(str(ws.input)), str(ws.input), save_as_external_data=True, location=location,
              size_threshold=0)
    ws.data = folder / location
    ws.data_bytes = ws.data.read_bytes()
    ws.input_bytes, ws.input_mtime, ws.listing = ws.input.read_bytes(), ws.input.stat().st_mtime_ns, ws.files()
    return ws


@pytest.mark.parametrize("location, out, clash", [
    ("out.onnx.data", "out.onnx", "out.onnx.data"),  # OUT's data file is the input's
    ("in.onnx.data", "in.onnx.data", "in.onnx.data"),  # OUT is the input's data file
    ("weights.bin", "weights.bin", "weights.bin"),
], ids=["out-data-is-input-data", "out-is-input-data", "out-is-other-data-file"])
def test_output_that_would_replace_the_inputs_data_is_refused(tmp_path, location, out, clash, cli):
    ws = _external_input(tmp_path, location)
    for flags in ([], ["--overwrite"]):  # --overwrite only allows OUT to be IN itself
        result = cli(ws.input, tmp_path / out, *flags, code=2)
        assert_one_error_line(result, clash, "external data")
        ws.assert_nothing_written()
        assert ws.data.read_bytes() == ws.data_bytes


def test_output_whose_data_file_is_a_link_to_the_inputs_data_is_refused(tmp_path, cli):
    ws = _external_input(tmp_path, "in.onnx.data")
    (tmp_path / "out.onnx.data").symlink_to(ws.data)
    ws.listing = ws.files()
    assert_one_error_line(cli(ws.input, ws.out, code=2), "in.onnx.data")
    ws.assert_nothing_written()
    assert ws.data.read_bytes() == ws.data_bytes


def test_overwrite_replaces_the_input_and_its_data_file(tmp_path, cli):
    ws = _external_input(tmp_path, "in.onnx.data")
    original = onnx.load(str(ws.input))
    cli(ws.input, ws.input, "--overwrite", "-q")
    assert ws.files() == ws.listing
    assert ws.data.read_bytes() != ws.data_bytes
    rescaled = onnx.load(str(ws.input))
    assert_same_structure(original, rescaled)
    assert_same_function(original, rescaled)
    assert weights_changed(original, rescaled)


# ---------------------------------------------------------------------------- the real executable
def _command():
    script = Path(sys.executable).parent / ("onnx-pathcond.exe" if os.name == "nt" else "onnx-pathcond")
    return [str(script)] if script.exists() else [sys.executable, "-m", "onnx_pathcond.cli"]


def test_console_script_on_mlp(tmp_path, run_command):
    ws = Workspace(tmp_path, MLP)
    proc = run_command(_command() + [ws.input, ws.out])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0] == f"onnx-pathcond: {ws.input} -> {ws.out}"
    assert any(line.strip().startswith("groups") and "768 rescalable" in line for line in lines)
    assert any(line.strip().startswith("check") and "equivalent" in line for line in lines)
    ws.assert_only_new("out.onnx")
    assert_valid_output(ws)


def test_module_error_is_one_line_on_real_stderr(tmp_path, run_cli):
    proc = run_cli(tmp_path / "nope.onnx", tmp_path / "out.onnx")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ") and "nope.onnx" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_streamed_writer_gives_protobufs_own_bytes(tmp_path):
    import io
    from onnx_pathcond import protoio
    for path in [repo.model("resnet.dynamo_bn.onnx"), repo.model("helper_mlp.onnx"), repo.model("mlp.onnx")]:
        model = onnx.load(path)
        buf = io.BytesIO()
        protoio.write_model(model, buf)
        assert buf.getvalue() == model.SerializeToString()
