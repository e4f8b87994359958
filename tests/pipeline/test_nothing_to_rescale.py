"""A model without any rescalable group skips the statistics and the solver: the output is
written unchanged (and checked), without paying for a step whose result would be thrown away."""

from __future__ import annotations

import json

import onnx
import pytest

from support.nets import Net


def sigmoid_mlp() -> onnx.ModelProto:
    """Gemm-Sigmoid-Gemm-Sigmoid-Gemm: every hidden channel is behind a barrier."""
    net = Net([1, 6], seed=5)
    x = net.node("Sigmoid", [net.gemm(net.x, 6, 8)])
    x = net.node("Sigmoid", [net.gemm(x, 8, 8)])
    return net.model(net.gemm(x, 8, 3))


def test_command_line_writes_the_model_unchanged_without_statistics(tmp_path, run_cli):
    source, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(sigmoid_mlp(), str(source))
    proc = run_cli(source, out, "--report", report)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "solver     skipped, no rescalable group" in proc.stdout
    assert "diag(G)" not in proc.stdout
    r = json.loads(report.read_text())
    assert r["groups"]["rescalable"] == 0
    assert "statistics" not in r["timings"] and "solve" not in r["timings"]
    assert r["statistics"] == {} and r["criterion"] == {}
    assert r["solver"]["method"] == "skipped, no rescalable group"
    assert r["verification"]["passed"] is True and "verify" in r["timings"]
    before, after = onnx.load(str(source)), onnx.load(str(out))
    assert [t.SerializeToString() for t in after.graph.initializer] == \
           [t.SerializeToString() for t in before.graph.initializer]


def test_the_statistics_are_not_computed(monkeypatch):
    from onnx_pathcond import rescale, stats

    def must_not_run(*args, **kwargs):
        raise AssertionError("the statistics step ran on a model with no rescalable group")

    monkeypatch.setattr(stats, "compute_diag_g", must_not_run)
    model, report = rescale(sigmoid_mlp())
    assert report.groups.rescalable == 0 and report.verification.passed
    with pytest.raises(AssertionError, match="statistics step ran"):  # and it would have been called otherwise
        from support.nets import mlp
        rescale(mlp([4, 5, 3], seed=0))
