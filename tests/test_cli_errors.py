"""Bad input and interruptions, through the real command line (a subprocess each).

Each case checks the whole contract: the exit code, exactly one `error: ...` line on stderr,
no traceback, nothing at OUT, no temporary folder left next to it, the input untouched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from nets import Net, mlp

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnx_pathcond.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=_env())


def _env():
    # The checkout's code, also when pytest runs from a worktree with the package installed elsewhere.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def assert_error(proc, code: int, *fragments) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, f"exit code {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert proc.stdout == ""
    return lines[0]


class Folder:
    """A folder with the input model; `assert_unchanged` proves nothing appeared (hidden
    temporary folders included) and the input is as it was."""

    def __init__(self, path: Path, model: onnx.ModelProto, name: str = "in.onnx"):
        self.dir = path
        self.input = path / name
        onnx.save(model, str(self.input))
        self.out = path / "out.onnx"
        self.bytes = self.input.read_bytes()
        self.listing = sorted(os.listdir(path))

    def assert_unchanged(self):
        assert sorted(os.listdir(self.dir)) == self.listing, sorted(set(os.listdir(self.dir)) - set(self.listing))
        assert self.input.read_bytes() == self.bytes


def dynamic_mlp() -> onnx.ModelProto:
    net = Net(["N", 4], seed=0)
    return net.model(net.matmul(net.relu(net.matmul(net.x, 4, 5)), 5, 3))


# ---------------------------------------------------------------------------- zero-sized dimensions
def test_weight_with_a_zero_sized_dimension(tmp_path):
    net = Net([1, 4], seed=0)
    hidden = net.relu(net.matmul(net.x, 4, 0))  # a (4, 0) weight: a layer without any channel
    f = Folder(tmp_path, net.model(net.matmul(hidden, 0, 3)))
    assert_error(run_cli(f.input, f.out), 1, "'w1'", "[4, 0]", "size 0")
    f.assert_unchanged()


@pytest.mark.parametrize("axis", [0, 1])
def test_input_declared_with_a_zero_sized_dimension(tmp_path, axis):
    model = mlp([4, 5, 3], seed=0)
    model.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = 0
    f = Folder(tmp_path, model)
    assert_error(run_cli(f.input, f.out), 1, "input 'x'", f"size 0 at axis {axis}")
    f.assert_unchanged()


# ---------------------------------------------------------------------------- sizes too large
@pytest.mark.parametrize("spec", ["x:99999999999999999999x4", "x:999999999x4"])
def test_input_shape_too_large(tmp_path, spec):
    f = Folder(tmp_path, dynamic_mlp())
    assert_error(run_cli(f.input, f.out, "--input-shape", spec), 2, "--input-shape", spec, "too many")
    f.assert_unchanged()


def test_input_declared_too_large(tmp_path):
    model = dynamic_mlp()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[1].dim_value = 100000, 100000
    f = Folder(tmp_path, model)
    assert_error(run_cli(f.input, f.out), 1, "input 'x'", "too large")
    f.assert_unchanged()


# ---------------------------------------------------------------------------- tolerances
@pytest.mark.parametrize("option", ["--rtol", "--tol"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_tolerance_must_be_finite_and_not_negative(tmp_path, option, value):
    f = Folder(tmp_path, mlp([4, 5, 3], seed=0))
    assert_error(run_cli(f.input, f.out, option, value), 2, option, value)
    f.assert_unchanged()


@pytest.mark.parametrize("name, value", [("rtol", float("nan")), ("tol", float("inf"))])
def test_the_api_refuses_those_tolerances_too(name, value):
    from onnx_pathcond import InputError, rescale

    with pytest.raises(InputError, match=name):
        rescale(mlp([4, 5, 3], seed=0), **{name: value})


# ---------------------------------------------------------------------------- OUT
@pytest.mark.parametrize("out, fragment", [("", "empty"), ("newdir/", "directory"), ("sub", "directory"),
                                           (".", "directory")])
def test_output_that_is_not_a_file_name(tmp_path, out, fragment):
    (tmp_path / "sub").mkdir()
    f = Folder(tmp_path, mlp([4, 5, 3], seed=0))
    assert_error(run_cli(f.input, out, cwd=tmp_path), 2, fragment)
    f.assert_unchanged()
    assert os.listdir(tmp_path / "sub") == []
    assert not [name for name in os.listdir(tmp_path.parent) if name.endswith(".tmp")]  # '' once wrote there


