"""Channel shuffles keep their neurons: Reshape (N, C, H, W → N, g, C/g, H, W) → Transpose →
Reshape back permutes the channels, and the tool follows each element through the moves.

A ShuffleNet-v2-style network (channel split, a branch of 1×1, depthwise 3×3 and 1×1
convolutions with BatchNorm, concatenation, shuffle) is exported by both PyTorch exporters,
the legacy one also with a dynamic batch (its shuffle then computes the Reshape targets from
Shape nodes). Every BatchNorm's channels are neurons (the convolutions before them are not:
their γ and β carry the scale), so the groups expected come from the module: the sum of the
BatchNorm widths. onnxruntime checks the rescaled model.

The dynamo exporter (optimize=False, which keeps BatchNorm) writes `chunk` as SplitToSequence
and SequenceAt (ops/sequence.py): checked with `chunk` and with the split written as two
slices."""

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from support.checks import assert_equivalent  # noqa: E402
from models.make_models import export_dynamo, export_legacy  # noqa: E402
from onnx_pathcond import rescale  # noqa: E402


def _shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class Unit(nn.Module):
    def __init__(self, channels, split_by_slicing=False):
        super().__init__()
        half = channels // 2
        self.half, self.split_by_slicing = half, split_by_slicing
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x):
        if self.split_by_slicing:
            left, right = x[:, :self.half], x[:, self.half:]
        else:
            left, right = x.chunk(2, dim=1)
        return _shuffle(torch.cat((left, self.branch(right)), dim=1), 2)


def _shufflenet(split_by_slicing=False):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                           Unit(16, split_by_slicing), Unit(16, split_by_slicing), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten(), nn.Linear(16, 4))
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics of a trained network, not the defaults
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return module.eval()


def _expected_groups(module):
    return sum(m.num_features for m in module.modules() if isinstance(m, nn.BatchNorm2d))


EXPORTS = {
    "legacy": lambda m, x: export_legacy(m, x, training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False),
    "legacy_dynamic_batch": lambda m, x: export_legacy(m, x, training=torch.onnx.TrainingMode.PRESERVE,
                                                       do_constant_folding=False, dynamic_axes={"x": {0: "N"}}),
    "dynamo": lambda m, x: export_dynamo(m, x, optimize=False),
}


@pytest.mark.parametrize("exporter", sorted(EXPORTS))
def test_shufflenet_units_rescale_every_batchnorm_channel(exporter):
    module = _shufflenet(split_by_slicing=exporter == "dynamo")
    model = EXPORTS[exporter](module, torch.randn(1, 3, 8, 8))
    assert any(n.op_type == "Transpose" for n in model.graph.node)  # the shuffle is there
    out, report = rescale(model)
    assert report.groups.rescalable == _expected_groups(module)
    assert not any(row.category == "barrier" for row in report.frozen), report.frozen
    assert report.verification.passed
    assert_equivalent(model, out)


def test_a_split_into_a_sequence_rescales_every_batchnorm_channel():
    module = _shufflenet()
    model = export_dynamo(module, torch.randn(1, 3, 8, 8), optimize=False)
    assert any(n.op_type == "SplitToSequence" for n in model.graph.node)  # what torch 2.13 writes for chunk
    out, report = rescale(model)
    assert report.groups.rescalable == _expected_groups(module)
    assert not any(row.category == "barrier" for row in report.frozen), report.frozen
    assert report.verification.passed
    assert_equivalent(model, out)
