"""A model without any rescalable group skips the statistics and the solver: the output is
written unchanged (and checked), without paying for a step whose result would be thrown away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from nets import Net

ROOT = Path(__file__).resolve().parent.parent


def sigmoid_mlp() -> onnx.ModelProto:
    """Gemm-Sigmoid-Gemm-Sigmoid-Gemm: every hidden channel is behind a barrier."""
    net = Net([1, 6], seed=5)
    x = net.node("Sigmoid", [net.gemm(net.x, 6, 8)])
    x = net.node("Sigmoid", [net.gemm(x, 8, 8)])
    return net.model(net.gemm(x, 8, 3))


def test_command_line_writes_the_model_unchanged_without_statistics(tmp_path):
    source, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(sigmoid_mlp(), str(source))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "onnx_pathcond.cli", str(source), str(out), "--report", str(report)],
                          capture_output=True, text=True, timeout=120, env=env)
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
        from nets import mlp
        rescale(mlp([4, 5, 3], seed=0))
