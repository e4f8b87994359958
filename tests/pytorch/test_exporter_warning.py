"""The folded-BatchNorm warning, on real PyTorch exports: a Transformer's transposed Linear
weights (`onnx::MatMul_*`) are no BatchNorm; a conv+BN module exported in eval mode is."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from onnx_pathcond import rescale  # noqa: E402


def _export(module, example, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=False)
    return str(path)


def _folded_warnings(path):
    _, report = rescale(path, dry_run=True)
    return [w for w in report.warnings if "BatchNorm" in w]


def test_transformer_encoder_has_no_batchnorm_warning(tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
    path = _export(encoder, torch.randn(1, 5, 8), tmp_path / "encoder.onnx")
    import onnx
    names = [i for n in onnx.load(path).graph.node if n.op_type == "MatMul" for i in n.input if i.startswith("onnx::")]
    assert names, "the export has no generated MatMul weight names: the test would prove nothing"
    assert _folded_warnings(path) == []


class ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def test_conv_batchnorm_folded_by_the_legacy_exporter_is_warned_about(tmp_path):
    torch.manual_seed(0)
    path = _export(ConvBN(), torch.randn(1, 3, 8, 8), tmp_path / "convbn.onnx")
    found = _folded_warnings(path)
    assert len(found) == 1 and "onnx::Conv_" in found[0], found
