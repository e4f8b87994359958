"""`--report` never overwrites a file the input is read from (the model file or its external
data), nor the output model or its data file: refused with exit code 2 and one error line
before any work, with every file left as it was. Through the real command line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest

from support.nets import mlp

pytest.importorskip("onnxruntime")


def _external_input(folder: Path, data_name: str) -> Path:
    """An MLP whose weights are all in one external data file named `data_name`."""
    path = folder / "in.onnx"
    onnx.save_model(mlp([6, 8, 5], seed=3), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=0)
    return path


def _digests(folder: Path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("report_name, dry_run", [
    ("in.onnx.data", False),   # the input's external data
    ("weights.bin", False),    # the same, under another name
    ("weights.bin", True),     # a dry run writes the report too
    ("in.onnx", True),         # the input model itself
])
def test_report_over_a_file_the_input_reads_is_refused(tmp_path, run_cli, report_name, dry_run):
    data_name = report_name if report_name != "in.onnx" else "in.onnx.data"
    src = _external_input(tmp_path, data_name)
    before = _digests(tmp_path)
    out = tmp_path / "out" / "out.onnx"
    out.parent.mkdir()
    args = [src, "--dry-run"] if dry_run else [src, out]
    proc = run_cli(*args, "--report", tmp_path / report_name)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and errors[0].startswith("error:") and report_name in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert _digests(tmp_path / "out") == {}  # nothing written
    assert _digests(tmp_path) == before


def test_report_over_the_output_data_file_is_refused(tmp_path, run_cli):
    src = _external_input(tmp_path, "in.onnx.data")
    before = _digests(tmp_path)
    out = tmp_path / "out.onnx"
    proc = run_cli(src, out, "--report", str(out) + ".data")
    assert proc.returncode == 2 and "--report" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert _digests(tmp_path) == before  # no OUT, no OUT.data


def test_report_elsewhere_is_written_and_the_input_kept(tmp_path, run_cli):
    """The control: the same run with the report in a file of its own succeeds."""
    src = _external_input(tmp_path, "weights.bin")
    before = _digests(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = run_cli(src, out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["input"].endswith("in.onnx")
    assert {k: v for k, v in _digests(tmp_path).items() if k in before} == before


def test_api_refuses_a_report_over_an_input_file(tmp_path):
    from onnx_pathcond.api import rescale_file
    from onnx_pathcond.errors import InputError

    src = _external_input(tmp_path, "weights.bin")
    before = (tmp_path / "weights.bin").read_bytes()
    with pytest.raises(InputError, match="report .*weights.bin"):
        rescale_file(str(src), str(tmp_path / "out.onnx"), report=tmp_path / "weights.bin")
    assert not (tmp_path / "out.onnx").exists()
    assert (tmp_path / "weights.bin").read_bytes() == before
