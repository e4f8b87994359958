"""Local functions from PyTorch's exporter (`export_modules_as_functions`, for a block class and
for nn.Linear): the groups inside the function bodies are found (counts from the module's
layers), the result is equivalent, and diag(G) through the bodies equals that of the plain export
of the same weights. The hand-built cases are in tests/ops/test_local_functions.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from support.checks import assert_equivalent
from onnx_pathcond import rescale
from onnx_pathcond.api import analyse_model
from onnx_pathcond.stats import diag_g_by_tensor

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
nn = torch.nn


class Block(nn.Module):
    def __init__(self, cin, hidden, cout):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cin, hidden), nn.Linear(hidden, cout)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class BlockNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.b1, self.b2 = nn.Linear(4, 10), Block(10, 12, 10), Block(10, 7, 3)

    def forward(self, x):
        return self.b2(torch.relu(self.b1(torch.relu(self.inp(x)))))


def _export(module, path, functions):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 4),), str(path), dynamo=False, input_names=["x"],
                          do_constant_folding=False, export_modules_as_functions=functions)
    return onnx.load(str(path))


@pytest.mark.parametrize("kind", ["block", "linear"])
def test_torch_exports_with_modules_as_functions(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "block":
        module, functions = BlockNet().eval(), {Block}
        hidden = 10 + 12 + 10 + 7  # every Linear's output but the last one's
    else:
        module = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
        functions, hidden = {nn.Linear}, 10 + 12
    with_functions = _export(module, tmp_path / "f.onnx", functions)
    plain = _export(module, tmp_path / "p.onnx", False)
    assert with_functions.functions and not plain.functions
    out, report = rescale(with_functions)
    assert report.groups.rescalable == hidden and report.verification.passed
    assert_equivalent(with_functions, out)
    # diag(G) through the bodies equals that of the plain export of the same weights
    graph, analysis, _ = analyse_model(with_functions)
    plain_graph, plain_analysis, _ = analyse_model(plain)
    got, expected = diag_g_by_tensor(graph, analysis), diag_g_by_tensor(plain_graph, plain_analysis)
    assert set(got) == set(expected) and got
    for name in got:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-12, err_msg=name)
