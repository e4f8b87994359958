"""benchmarks/training/bench_training.py: the --quick grid end to end (every method), and
the pieces its figures rest on, checked independently: the rescaled nets compute what the
originals do (in eval and train mode, on data the rescaling never saw) while their weights did
move, and the epochs reported are those at which the recorded accuracy first reached the target."""

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("onnx_pathcond.torch")

from support.repo import ROOT  # noqa: E402  (the repository, whatever the working directory)
SCRIPT = os.path.join(ROOT, "benchmarks", "training", "bench_training.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The --quick grid, run as a user would run it."""
    out = tmp_path_factory.mktemp("quick")
    done = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out, json.loads((out / "runs.json").read_text())["runs"], (out / "training.md").read_text()


def _expected_cells(bench):
    """(net, optimizer, method) of every run --quick makes: the methods that apply there."""
    return {(n, o, m) for n in bench.QUICK["nets"] for o in bench.OPTIMIZERS for m in bench.METHODS
            if bench.applies(m, bench.build_net(n, 0), o)}


@pytest.mark.slow
def test_quick_grid_runs_every_method(bench, quick):
    out, runs, _ = quick
    cells = {(r["net"], r["optimizer"], r["method"]) for r in runs}
    assert cells == _expected_cells(bench)
    assert len(runs) == len(cells)  # one seed, one learning rate per optimizer
    assert {m for _, _, m in cells} == set(bench.METHODS)  # every method ran somewhere
    assert {(n, m) for n, o, m in cells if o == "sgd" and m.endswith("_recreate")} == set()  # the same as carry
    for run in runs:
        rescaling = run["rescaling"]
        assert rescaling["error"] is None, (run["net"], run["method"], rescaling["error"])
        assert run["lr"] == (bench.QUICK["adam_lrs"][0] if run["optimizer"] == "adam" else bench.QUICK["lrs"][0])
        assert 2 <= len(run["loss"]) == len(run["eval_loss"]) == len(run["accuracy"]) <= bench.QUICK["epochs"] + 1
        assert all(math.isfinite(v) and v > 0 for v in run["loss"] + run["eval_loss"])
        assert all(0 <= a <= 1 for a in run["accuracy"])
        assert run["diverged"] is None and 0 < run["test_accuracy"] <= 1
        assert run["steps"] == [] and run["step_errors"] == 0  # no step after the last epoch


@pytest.mark.slow
def test_quick_grid_rescaled_nets_start_from_the_same_function(bench, quick):
    """Epoch 0 is the net before any step: every method of a net starts at the loss (train
    mode and eval mode) and accuracy of the net as built, while each rescaling did move the
    weights (with BatchNorm statistics, train mode within the tool's looser tolerance)."""
    _, runs, _ = quick
    for net, optimizer in {(r["net"], r["optimizer"]) for r in runs}:
        by_method = {r["method"]: r for r in runs if r["net"] == net and r["optimizer"] == optimizer}
        start = by_method["none"]
        for method, run in by_method.items():
            rel = 1e-2 if bench.METHODS[method].bn_statistics else 1e-5
            assert run["loss"][0] == pytest.approx(start["loss"][0], rel=rel), (net, method)
            assert run["eval_loss"][0] == pytest.approx(start["eval_loss"][0], rel=1e-5), (net, method)
            assert run["accuracy"][0] == start["accuracy"][0], (net, method)
            if method != "none":
                assert run["rescaling"]["start_difference"] < rel, (net, method)
                assert run["rescaling"]["max_abs_u"] > 0.1, (net, method)  # something was rescaled
        for method in ("pathcond", "pathcond_exact", "pathcond_every5_carry"):  # PathCond lowers AM/GM of diag(G)
            r = by_method[method]["rescaling"]
            assert r["am_gm_after"] < r["am_gm_before"], (net, method)
        # a schedule starts from its criterion's rescaling at initialisation
        assert by_method["pathcond_every20_carry"]["rescaling"] == by_method["pathcond"]["rescaling"]
        assert by_method["enorm_every1_carry"]["rescaling"] == by_method["enorm"]["rescaling"]


@pytest.mark.slow
def test_quick_grid_writes_a_table_row_per_method_and_a_plot(bench, quick):
    out, runs, table = quick
    expected = _expected_cells(bench)
    for net in bench.QUICK["nets"]:
        section = table.split(f"## {net}:")[1].split("\n## ")[0]
        for optimizer, label in bench.OPTIMIZER_LABELS.items():
            lr = bench.QUICK["adam_lrs" if optimizer == "adam" else "lrs"][0]
            rows = [line for line in section.splitlines() if line.startswith(f"| {label} | {lr:g} |")]
            assert [row.split("|")[3].strip() for row in rows] == [
                bench.METHOD_LABELS[m] for m in bench.METHODS if (net, optimizer, m) in expected]
            assert all("rescaling failed" not in row for row in rows)
    for heading in ("## Is it safe?", "## At each learning rate", "## At each method's best learning rate"):
        part = table.split(heading)[1].split("\n## ")[0]
        for net in bench.QUICK["nets"]:
            for label in bench.OPTIMIZER_LABELS.values():
                assert f"| {net} | {label} |" in part or f"### {net}, {label}\n" in part, (heading, net, label)
    png = out / "training_loss.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists()
        return
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize("net_name, method, optimizer, epochs, expected", [
    ("moons_mlp", "pathcond_every5_carry", "momentum", 11, [5, 10]),
    ("moons_mlp", "pathcond_every5_recreate", "momentum", 11, [5, 10]),
    ("moons_mlp", "pathcond_every5_carry", "adam", 6, [5]),
    ("moons_mlp", "pathcond_every5_recreate", "adam", 6, [5]),
    ("moons_mlp", "enorm_every1_carry", "sgd", 4, [1, 2, 3]),
    ("moons_mlp", "enorm_every1_carry", "adam", 3, [1, 2]),
    ("mlp_bn_k3", "pathcond_every5_carry_bnstat", "momentum", 6, [5]),
])
def test_schedule_steps(bench, net_name, method, optimizer, epochs, expected):
    """A scheduled method sweeps once after every k-th epoch except the last, each step checked
    by the conditioner (outputs unchanged, else the step fails and is counted); `carry` moves
    the optimizer's state into the new coordinates, `recreate` starts a new optimizer (and
    carries nothing); plain SGD has no state to carry."""
    torch.set_num_threads(1)
    data = bench.load_data(bench.NETS[net_name].data)
    net = bench.build_net(net_name, 0, "torch")
    assert bench.apply_method(net, method, data).error is None
    lr = 0.001 if optimizer == "adam" or net_name == "mlp_bn_k3" else 0.01  # slow: no 100 % before the last epoch
    run = bench.train(net, data, bench.Run(net_name, method, lr, 0, optimizer), epochs=epochs)
    assert run.step_errors == 0, run.step_error
    assert run.diverged is None and run.reached["100"] is None and len(run.loss) == epochs + 1
    assert [s["epoch"] for s in run.steps] == expected
    for step in run.steps:
        assert step["F_after"] <= step["F_before"] * (1 + 1e-9)  # one sweep does not make the criterion worse
        state = bench.METHODS[method].state
        if state == "carry" and optimizer != "sgd":
            assert step["state_changed"] > 0  # momentum buffers, Adam's moments
        else:
            assert step["state_changed"] == 0


@pytest.mark.parametrize("net_name", ["mlp_unbalanced", "cnn_bn", "resnet"])
def test_rescaled_net_computes_the_same_function(bench, net_name):
    """The benchmark's rescaling step against a copy of the net taken before it, on the test
    set (never seen by the rescaling), in eval mode and in train mode (BatchNorm on batch
    statistics), for each method; and the weights really moved (so the comparison can fail)."""
    torch.set_num_threads(1)
    data = bench.load_data(bench.NETS[net_name].data)
    for method in ("pathcond", "pathcond_exact", "enorm"):
        net = bench.build_net(net_name, seed=3)
        original = copy.deepcopy(net)
        rescaling = bench.apply_method(net, method, data)
        assert rescaling.error is None, rescaling.error
        moved = max(float((a - b).detach().abs().max() / b.detach().abs().max())
                    for a, b in zip(net.parameters(), original.parameters()) if b.abs().max() > 0)
        assert moved > 0.05, (net_name, method)
        for training in (False, True):
            net.train(training)
            original.train(training)
            with torch.no_grad():
                expected, got = original(data.x_test).double(), net(data.x_test).double()
            assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5, (net_name, method, training)


def test_he_initialisation(bench):
    """Weights drawn with variance 2 / fan-in, zero biases, the same for the same seed."""
    net = bench.build_net("mlp_k3", seed=0)
    again = bench.build_net("mlp_k3", seed=0)
    other = bench.build_net("mlp_k3", seed=1)
    for layer, same, different in zip(net, again, other):
        if isinstance(layer, torch.nn.Linear):
            fan_in = layer.weight.shape[1]
            assert float(layer.weight.detach().var()) == pytest.approx(2 / fan_in, rel=0.1)
            assert float(layer.bias.detach().abs().max()) == 0
            assert torch.equal(layer.weight, same.weight) and not torch.equal(layer.weight, different.weight)


def test_epochs_to_target_and_divergence(bench):
    """The first epoch at or above each target, read from the recorded accuracies; a learning
    rate far too large is caught as a divergence, and the run stops there."""
    torch.set_num_threads(1)
    data = bench.load_data("moons")
    run = bench.train(bench.build_net("moons_mlp", 0), data, bench.Run("moons_mlp", "none", 0.2, 0), epochs=60)
    assert run.diverged is None
    for target, key in ((0.99, "99"), (1.0, "100")):
        first = next((epoch for epoch, a in enumerate(run.accuracy) if epoch and a >= target), None)
        assert run.reached[key] == first
    assert run.reached["99"] is not None  # two moons is easy: 99 % within 60 epochs
    if run.reached["100"] is not None:  # the run stops at 100 %
        assert len(run.accuracy) == run.reached["100"] + 1
    blown = bench.train(bench.build_net("mlp_k5", 0), bench.load_data("digits"), bench.Run("mlp_k5", "none", 50.0, 0),
                        epochs=20)
    assert blown.diverged is not None and len(blown.loss) == blown.diverged + 1
    assert not blown.loss[-1] <= bench.DIVERGENCE_FACTOR * blown.loss[0]  # inf, or past the limit
    assert blown.test_accuracy is None and blown.reached == {"99": None, "100": None}


def test_median_epochs(bench):
    assert bench._median_epoch([3, 5, 4]) == 4
    assert bench._median_epoch([3, None, 4]) == 4  # a seed that never got there is the slowest
    assert bench._median_epoch([3, None, None]) is None
    assert bench._median_epoch([2, 4]) == 3


@pytest.mark.slow
def test_from_json_writes_the_same_table(bench, quick, tmp_path):
    """--from-json rebuilds the table from runs.json alone, identical to the one of the run."""
    out, _, table = quick
    assert bench.main(["--from-json", str(out / "runs.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "training.md").read_text() == table
