"""The report holds typed records; its JSON and its text are built from them."""

import json

import numpy as np

import pytest

from onnx_pathcond import rescale
from onnx_pathcond.pathnet.records import RuntimeInfo
from onnx_pathcond.records import CriterionSummary, GroupCounts, ModelSummary, SolverSummary, VerificationSummary
from onnx_pathcond.report import Report
from support import repo


def test_records_are_typed_and_are_what_the_json_says():
    _, report = rescale(repo.model("mlp.onnx"))
    assert isinstance(report.statistics, RuntimeInfo) and report.statistics.backend == "numpy"
    assert isinstance(report.model, ModelSummary) and isinstance(report.groups, GroupCounts)
    assert isinstance(report.criterion, CriterionSummary) and isinstance(report.solver, SolverSummary)
    assert isinstance(report.verification, VerificationSummary)
    assert report.groups.rescalable == 768 and report.solver.converged in (True, False)
    assert report.verification.passed is True and report.verification.outputs[0].name == "y"
    d = json.loads(report.to_json())
    assert d["groups"] == report.groups.as_dict() and d["solver"]["sweeps"] == report.solver.sweeps
    assert [r["name"] for r in d["rewritten"]] == [r.name for r in report.rewritten]
    assert d["layers"][0]["lambda_min"] == report.layers[0].lambda_min
    assert d["verification"]["outputs"][0]["max_rel"] == report.verification.outputs[0].max_rel
    assert d["solver"]["converged"] == report.solver.converged
    assert d["model"]["parameters"] == report.model.parameters == 535818
    with pytest.raises(TypeError):  # a record is read one way only: by its fields
        report.solver["converged"]


def test_dry_run_json_has_empty_records_and_layers_without_lambda():
    _, report = rescale(repo.model("cnn.onnx"), dry_run=True)
    d = report.to_dict()
    assert d["statistics"] == d["criterion"] == d["solver"] == {} and d["rewritten"] == []
    assert d["verification"] is None
    assert d["layers"] and all("lambda_min" not in row for row in d["layers"])
    assert "solver" not in report.summary()


def test_statistics_record_is_the_steps_object():
    report = Report()
    runtime = RuntimeInfo(requested="cuda", backend="onnxruntime",
                          providers=["CUDAExecutionProvider", "CPUExecutionProvider"], notice="CUDA ran 12 of 14 nodes",
                          nodes=14, nodes_by_provider={"CUDAExecutionProvider": 12, "CPUExecutionProvider": 2},
                          cpu_fallback_ops={"Shape": 2})
    report.describe_statistics(runtime)
    assert report.statistics is runtime and report.statistics.backend == "onnxruntime"
    assert report.statistics.providers == runtime.providers
    assert report.warnings == ["CUDA ran 12 of 14 nodes"]
    assert report.to_dict()["statistics"] == runtime.as_dict()
    text = report.summary(verbose=True)
    assert "diag(G) on onnxruntime (CUDAExecutionProvider 12 nodes, CPUExecutionProvider 2 nodes; float64)" in text
    assert "on CPU   Shape x2" in text
    assert "on CPU" not in report.summary()


def _frozen_by_definition(graph, an, groups):
    """The frozen rows written out with plain loops: each frozen group's reason is that of the
    first freeze (in the analysis' order) that reaches it; groups are gathered by the tensor
    they start in and that reason, rows in the order of their first group."""
    from onnx_pathcond.report import channel_ranges
    from onnx_pathcond.nodes import node_label

    root = groups.root_of_position
    first = {}
    for fr in an.freezes:
        for r in np.unique(root[np.ravel(fr.pos)]).tolist():
            first.setdefault(r, (fr.category, fr.reason))
    assert sorted(first) == groups.frozen_roots.tolist()
    starts = [b.start for b in an.blocks]
    gathered = {}
    for r in groups.frozen_roots.tolist():
        k = int(np.searchsorted(starts, r, side="right") - 1)
        gathered.setdefault((k,) + first[r], []).append(r - starts[k])
    return [(node_label(graph.nodes[an.blocks[k].node_index]), an.blocks[k].tensor, channel_ranges(np.array(chans)),
             len(chans), category, reason) for (k, category, reason), chans in gathered.items()]


@pytest.mark.parametrize("seed", range(16))
def test_frozen_rows_and_reasons_match_their_definition(seed):
    """build_groups' reason per frozen group and the report's rows, against plain loops, on the
    shipped models (BatchNorm, shuffles, concatenations; with and without --bn-statistics) and
    random graphs."""
    from onnx_pathcond import load_model
    from onnx_pathcond.api import analyse_model
    from onnx_pathcond.report import frozen_summary
    from support.randmodels import generate

    shipped = repo.shipped_models()
    models = [load_model(f) for f in shipped[seed::16]] + [generate(seed)[0], generate(seed + 16)[0]]
    rows = 0
    for model in models:
        for bn_statistics in (False, True):
            graph, an, groups = analyse_model(model, bn_statistics=bn_statistics)
            got = [(r.node, r.tensor, r.channels, r.groups, r.category, r.reason)
                   for r in frozen_summary(graph, an, groups)]
            assert got == _frozen_by_definition(graph, an, groups)
            rows += len(got)
    assert rows > 0
