"""The options record (`RescaleOptions`, `SolveOptions`): one source of defaults and checks for
`rescale`, `rescale_file`, the command line, `RescalingPlan.solve` and `PathConditioner`; and
`rescale_file`, what the command line runs. Messages name options by their keyword in the API
and by their flag on the command line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from support import repo
from support.nets import mlp
from onnx_pathcond import InputError, RescaleOptions, SolveOptions, options, rescale, rescale_file
from onnx_pathcond.plan import RescalingPlan

pytest.importorskip("onnxruntime")


def test_defaults_are_the_command_lines():
    from onnx_pathcond.cli import main

    record = RescaleOptions()
    flags = {p.name: p.default for p in main.params}
    for name in ("criterion", "solver", "max_iter", "tol", "backend", "device", "verify_output", "rtol", "seed",
                 "bn_statistics"):
        assert getattr(record, name) == flags[name], name
    assert record.settings == options.SOLVERS[options.DEFAULT_SOLVER]
    assert RescaleOptions(criterion="enorm").settings == options.ENORM_SOLVERS["cd"]
    assert RescaleOptions(solver="exact", max_iter=7).settings == options.SolverSettings("exact", 7, 1e-6)


@pytest.mark.parametrize("changes, fragment", [
    ({"solver": "newton"}, "unknown solver 'newton'"),
    ({"criterion": "pathnorm"}, "unknown criterion 'pathnorm'"),
    ({"max_iter": -1}, "max_iter must not be negative"),
    ({"max_iter": 2.5}, "max_iter must be a whole number"),
    ({"max_iter": True}, "max_iter must be a whole number"),
    ({"tol": float("nan")}, "tol must be a finite number"),
    ({"tol": "small"}, "tol must be a finite number"),
    ({"rtol": -1e-3}, "rtol must be a finite number"),
    ({"rtol": float("inf")}, "rtol must be a finite number"),
    ({"backend": "torch"}, "unknown backend 'torch'"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"bn_statistics": "yes"}, "bn_statistics must be True or False"),
    ({"verify_output": 1}, "verify_output must be True or False"),
    ({"criterion": "enorm", "bn_statistics": True}, "bn_statistics=True works with the pathcond criterion only"),
    ({"input_shapes": ["x:1x0"]}, "dimensions must be positive integers"),
    ({"input_shapes": ["x:1x3", "x:1x4"]}, "input_shapes given more than once for 'x'"),
    ({"input_shapes": {"x": 3}}, "input_shapes for 'x' must be a tuple of positive integers"),
    ({"input_shapes": {"x": (1, "3")}}, "input_shapes for 'x' must be a tuple of positive integers"),
    ({"verbose": True}, "unknown option verbose="),
])
def test_a_bad_option_is_one_line_naming_its_keyword(changes, fragment):
    with pytest.raises(InputError) as caught:
        RescaleOptions.of(**changes)
    message = str(caught.value)
    assert fragment in message and "\n" not in message and "--" not in message
    with pytest.raises(InputError, match=fragment.split("'")[0].split("=")[0]):  # the same from rescale, before any work
        rescale(repo.model("mlp.onnx"), **changes)


def test_input_shapes_are_held_as_a_dict_whichever_way_given():
    assert RescaleOptions(input_shapes=["x:1x3x8x8"]).input_shapes == {"x": (1, 3, 8, 8)}
    assert RescaleOptions(input_shapes={"x": [1, 3, 8, 8]}).input_shapes == {"x": (1, 3, 8, 8)}
    assert RescaleOptions(input_shapes={"x": (np.int64(2), 3)}).input_shapes == {"x": (2, 3)}
    assert RescaleOptions().input_shapes == {}


def test_replace_checks_as_a_new_record_does():
    record = RescaleOptions(solver="exact", seed=3)
    changed = record.replace(max_iter=5)
    assert (changed.solver, changed.seed, changed.max_iter, record.max_iter) == ("exact", 3, 5, None)
    with pytest.raises(InputError, match="max_iter must not be negative"):
        record.replace(max_iter=-2)
    with pytest.raises(InputError, match="unknown option shapes="):
        record.replace(shapes=["x:1"])
    assert record.solve_options() == SolveOptions(solver="exact")
    with pytest.raises(InputError, match="options must be a RescaleOptions"):
        rescale(repo.model("mlp.onnx"), options={"solver": "exact"})


def test_a_record_and_keywords_give_the_same_run_as_keywords_alone():
    record = RescaleOptions(solver="exact", seed=5, max_iter=40)
    by_record, report_a = rescale(repo.model("mlp.onnx"), options=record, tol=1e-8)
    by_keywords, report_b = rescale(repo.model("mlp.onnx"), solver="exact", seed=5, max_iter=40, tol=1e-8)
    assert by_record.SerializeToString() == by_keywords.SerializeToString()
    assert report_a.solver.method.startswith("exact") and report_a.verification.seed == 5
    timeless = [{k: v for k, v in r.to_dict()["solver"].items() if "seconds" not in k} for r in (report_a, report_b)]
    assert timeless[0] == timeless[1]


def test_plan_solve_takes_the_record_or_keywords():
    plan = RescalingPlan(onnx.load(repo.model("mlp.onnx")))
    by_record = plan.solve(SolveOptions(solver="exact", tol=1e-9))
    by_keywords = plan.solve(solver="exact", tol=1e-9)
    np.testing.assert_array_equal(by_record.u, by_keywords.u)
    assert by_record.settings == options.SolverSettings("exact", 1000, 1e-9)
    with pytest.raises(InputError, match="unknown option seed="):
        plan.solve(seed=1)  # a check's option, not a solve's


# ---------------------------------------------------------------------------- rescale_file
def test_rescale_file_writes_the_model_and_its_report(tmp_path):
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    report = rescale_file(repo.model("mlp.onnx"), out, report=report_path, seed=2)
    in_memory, _ = rescale(repo.model("mlp.onnx"), seed=2)
    assert out.read_bytes() == in_memory.SerializeToString()
    written = json.loads(report_path.read_text())
    assert written == json.loads(report.to_json()) and written["output"] == str(out)
    assert written["verification"]["passed"] and sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx",
                                                                                               "report.json"]


def test_rescale_file_dry_run_writes_only_the_report(tmp_path):
    report = rescale_file(repo.model("mlp.onnx"), tmp_path / "out.onnx", dry_run=True, report=tmp_path / "r.json")
    assert report.output is None and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert json.loads((tmp_path / "r.json").read_text())["groups"]["rescalable"] == report.groups.rescalable


def test_rescale_file_refuses_before_any_work(tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(mlp([5, 7, 3], seed=2), src)
    before = src.read_bytes()
    with pytest.raises(InputError, match="no output path given"):
        rescale_file(src)
    with pytest.raises(InputError, match=r"is the input file; pass overwrite=True"):
        rescale_file(src, src)
    with pytest.raises(InputError, match="unknown solver"):
        rescale_file(src, tmp_path / "out.onnx", solver="newton", report=tmp_path / "r.json")
    assert src.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["in.onnx"]
    report = rescale_file(src, src, overwrite=True)  # replaced as a whole, once checked
    assert report.verification.passed and src.read_bytes() != before


def test_the_command_line_spells_the_same_messages_as_flags(invoke_cli, tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save(mlp([5, 7, 3], seed=2), src)
    cases = [(["--criterion", "enorm", "--bn-statistics"], "--bn-statistics works with the pathcond criterion"),
             ([str(src)], "is the input file; pass --overwrite to replace it"),
             (["--input-shape", "x:1x5", "--input-shape", "x:2x5"], "--input-shape given more than once for 'x'")]
    for extra, fragment in cases:
        args = [str(src)] + ([] if extra == [str(src)] else [str(tmp_path / "out.onnx")]) + extra
        result = invoke_cli(*args)
        assert result.exit_code == 2, result.stderr
        assert result.stderr.strip() == f"error: {result.stderr.strip()[7:]}" and fragment in result.stderr
        assert "\u2063" not in result.stderr and "=True" not in result.stderr


def test_the_conditioner_refuses_a_bad_option_when_made():
    torch = pytest.importorskip("torch")
    from onnx_pathcond.torch import PathConditioner

    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(InputError, match="max_iter must not be negative"):
        PathConditioner(module, torch.randn(2, 3), max_iter=-1)
    with pytest.raises(InputError, match="PathConditioner does not take seed="):
        PathConditioner(module, torch.randn(2, 3), seed=1)
    cond = PathConditioner(module, torch.randn(2, 3), solver="exact")
    with pytest.raises(InputError, match="unknown solver"):
        cond.rescale(solver="newton")
    assert cond.rescale(max_iter=1).report.solver.method.startswith("exact")
