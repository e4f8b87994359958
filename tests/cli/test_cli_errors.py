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

import onnx
import pytest

from support.nets import Net, mlp


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
def test_weight_with_a_zero_sized_dimension(tmp_path, run_cli):
    net = Net([1, 4], seed=0)
    hidden = net.relu(net.matmul(net.x, 4, 0))  # a (4, 0) weight: a layer without any channel
    f = Folder(tmp_path, net.model(net.matmul(hidden, 0, 3)))
    assert_error(run_cli(f.input, f.out), 1, "'w1'", "[4, 0]", "size 0")
    f.assert_unchanged()


@pytest.mark.parametrize("axis", [0, 1])
def test_input_declared_with_a_zero_sized_dimension(tmp_path, axis, run_cli):
    model = mlp([4, 5, 3], seed=0)
    model.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = 0
    f = Folder(tmp_path, model)
    assert_error(run_cli(f.input, f.out), 1, "input 'x'", f"size 0 at axis {axis}")
    f.assert_unchanged()


# ---------------------------------------------------------------------------- sizes too large
@pytest.mark.parametrize("spec", ["x:99999999999999999999x4", "x:999999999x4"])
def test_input_shape_too_large(tmp_path, spec, run_cli):
    f = Folder(tmp_path, dynamic_mlp())
    assert_error(run_cli(f.input, f.out, "--input-shape", spec), 2, "--input-shape", spec, "too many")
    f.assert_unchanged()


def test_input_declared_too_large(tmp_path, run_cli):
    model = dynamic_mlp()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[1].dim_value = 100000, 100000
    f = Folder(tmp_path, model)
    assert_error(run_cli(f.input, f.out), 1, "input 'x'", "too large")
    f.assert_unchanged()


# ---------------------------------------------------------------------------- tolerances
@pytest.mark.parametrize("option", ["--rtol", "--tol"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_tolerance_must_be_finite_and_not_negative(tmp_path, option, value, run_cli):
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
def test_output_that_is_not_a_file_name(tmp_path, out, fragment, run_cli):
    (tmp_path / "sub").mkdir()
    f = Folder(tmp_path, mlp([4, 5, 3], seed=0))
    assert_error(run_cli(f.input, out, cwd=tmp_path), 2, fragment)
    f.assert_unchanged()
    assert os.listdir(tmp_path / "sub") == []
    assert not [name for name in os.listdir(tmp_path.parent) if name.endswith(".tmp")]  # '' once wrote there


# ---------------------------------------------------------------------------- signals
@pytest.fixture
def start_cli(checkout_env):
    """`start_cli(*args)`: the command line as a running process, for a signal to be sent to it."""
    def start(*args) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "onnx_pathcond.cli", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=checkout_env)
    return start


@pytest.mark.parametrize("delay", [0.2, 0.4])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path, delay, start_cli):
    # 0.2 s is inside the start-up (python, click, then onnx and onnxruntime loading: about a
    # second); later delays land wherever the run is by then. Whatever the moment, no traceback.
    # (Python's own first ~50 ms, before any line of ours runs, are out of our hands.)
    f = Folder(tmp_path, mlp([16, 64, 64, 4], seed=0))
    proc = start_cli(f.input, f.out)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    if proc.returncode in (0, -signal.SIGINT) and stderr == "" and f.out.exists():
        return  # it had finished, or was ending (the interpreter's teardown resets the handler)
    assert proc.returncode == 130, (proc.returncode, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted (SIGINT)"), stderr
    if "was written" not in lines[0]:
        f.assert_unchanged()


def _temporary_folders(folder: Path):
    return [name for name in os.listdir(folder) if name.startswith(".out.onnx.") and name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["TERM", "HUP", "INT"])
def test_signal_while_saving_or_verifying_removes_the_temporary_folder(tmp_path, signum, start_cli):
    # Four 2048-wide layers (50 MB): the written model waits in its temporary folder while
    # onnxruntime checks it, for a few tenths of a second.
    f = Folder(tmp_path, mlp([64, 2048, 2048, 2048, 2048, 10], seed=0))
    for attempt in range(3):
        proc = start_cli(f.input, f.out)
        deadline = time.monotonic() + 60
        while not _temporary_folders(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
        if proc.returncode == 0:  # finished between seeing the folder and the signal: try again
            f.out.unlink()
            continue
        assert "Traceback" not in stderr, stderr
        assert proc.returncode == 128 + signum, (proc.returncode, stderr)
        assert stderr.splitlines() == [f"error: interrupted ({signal.Signals(signum).name}); nothing was written"]
        f.assert_unchanged()
        return
    pytest.skip("the run always finished before the signal could be sent")


def test_a_signal_while_the_heavy_modules_load_is_held_until_they_are_loaded():
    # Raised inside an extension module's initialisation, the stop exception crashed the
    # interpreter (onnx's protobuf module: exit -11, one run in a hundred under load); inside
    # an import lock's callback it was swallowed and the run went on. So during that import
    # the signal is noted, and raised once the block is over.
    from onnx_pathcond.process import Interrupted, SignalsStop

    reached_the_end_of_the_block = False
    with pytest.raises(Interrupted) as raised:
        with SignalsStop() as stop:
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs in here, between two bytecodes
                reached_the_end_of_the_block = True
    assert reached_the_end_of_the_block and raised.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
