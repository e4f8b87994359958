"""Patterns of real PyTorch networks, exported by both exporters, with the groups expected read
off the PyTorch module (not from the tool) and the rescaled model checked with onnxruntime.

* A ShuffleNet-v2-style network (stem, a stride-2 unit with two branches, stride-1 units that
  split the channels with `chunk` or `torch.split`, and a channel shuffle written with
  view/transpose/view, reshape/permute/reshape or unflatten/transpose/flatten). What the
  exporters write for it: the legacy exporter's `chunk` is two Slices whose bounds are computed
  from Shape (and with a dynamic batch its shuffle's Reshape targets are Shape → Gather → … →
  Concat); its `split` a Split; the dynamo exporter without its optimiser writes both as
  SplitToSequence + SequenceAt, with it a Split.
* A network whose activations are `clamp(min=0)` (legacy: Clip with a min input; dynamo:
  Clip, or Max with 0 for an integer bound) and one with a `clamp(0, 6)` (ReLU6, a barrier).

Expected groups: each channel of a layer (convolution, BatchNorm, Linear) whose output goes,
through positively homogeneous ops only, to the next layer is one group; a layer followed by a
kept BatchNorm is frozen (`before_bn`: the BatchNorm's γ and β carry the scale), one followed
by a ReLU6 is frozen (`barrier`), and the last layer's outputs are the graph output. Where the
exporter folds BatchNorm into the convolution before it, the convolution's channels are the
neurons instead: the same number.
"""

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from support.checks import assert_equivalent  # noqa: E402
from models.make_models import export_dynamo, export_legacy  # noqa: E402
from onnx_pathcond import rescale  # noqa: E402

BN = nn.BatchNorm2d


def _conv_bn(cin, cout, kernel=1, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), BN(cout)]
    return layers + [nn.ReLU()] if relu else layers


class Shuffle(nn.Module):
    def __init__(self, groups, style):
        super().__init__()
        self.groups, self.style = groups, style

    def forward(self, x):
        n, c, h, w = x.shape
        g = self.groups
        if self.style == "view":
            return x.view(n, g, c // g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        if self.style == "reshape":
            return x.reshape(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)
        return x.unflatten(1, (g, c // g)).transpose(1, 2).flatten(1, 2)


class DownUnit(nn.Module):
    """Stride 2: both branches read the whole input; their outputs are concatenated, shuffled."""

    def __init__(self, cin, cout, style):
        super().__init__()
        half = cout // 2
        self.branch1 = nn.Sequential(*_conv_bn(cin, cin, 3, 2, groups=cin, relu=False), *_conv_bn(cin, half))
        self.branch2 = nn.Sequential(*_conv_bn(cin, half), *_conv_bn(half, half, 3, 2, groups=half, relu=False),
                                     *_conv_bn(half, half))
        self.shuffle = Shuffle(2, style)

    def forward(self, x):
        return self.shuffle(torch.cat((self.branch1(x), self.branch2(x)), dim=1))


class SplitUnit(nn.Module):
    """Stride 1: half of the channels go through, the other half through the branch."""

    def __init__(self, channels, split, style):
        super().__init__()
        half = channels // 2
        self.half, self.split = half, split
        self.branch2 = nn.Sequential(*_conv_bn(half, half), *_conv_bn(half, half, 3, groups=half, relu=False),
                                     *_conv_bn(half, half))
        self.shuffle = Shuffle(2, style)

    def forward(self, x):
        left, right = x.chunk(2, dim=1) if self.split == "chunk" else torch.split(x, [self.half, self.half], dim=1)
        return self.shuffle(torch.cat((left, self.branch2(right)), dim=1))


def _shufflenet(split, style):
    torch.manual_seed(0)
    module = nn.Sequential(*_conv_bn(3, 8, 3, 2), DownUnit(8, 16, style), SplitUnit(16, split, style),
                           SplitUnit(16, split, style), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    _trained_batchnorm(module)
    return module.eval()


def _trained_batchnorm(module):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)


class Clamp(nn.Module):
    def __init__(self, low=0.0, high=None):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x):
        return torch.clamp(x, min=self.low, max=self.high)


def _clamp_net(relu6):
    torch.manual_seed(2)
    module = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), Clamp(0.0, 6.0 if relu6 else None),
                           nn.Conv2d(6, 7, 3, padding=1), BN(7), Clamp(0),  # an integer bound
                           nn.MaxPool2d(2), nn.Flatten(), nn.Linear(7 * 4 * 4, 9), Clamp(0.0), nn.Linear(9, 3))
    _trained_batchnorm(module)
    return module.eval()


# ------------------------------------------------------------------------------ expected
def _layers(module):
    """The layers in the order they run (Conv2d, BatchNorm2d and Linear modules, depth first
    through the Sequentials in order), each with what follows it in its Sequential (None at
    the end of one)."""
    found = []
    children = list(module.children())
    for k, m in enumerate(children):
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            found.append((m, children[k + 1] if k + 1 < len(children) and isinstance(module, nn.Sequential)
                          else None))
        else:
            found.extend(_layers(m))
    return found


def _width(layer):
    return {nn.Conv2d: lambda m: m.out_channels, nn.BatchNorm2d: lambda m: m.num_features,
            nn.Linear: lambda m: m.out_features}[type(layer)](layer)


def expected_counts(module, bn_kept):
    """(rescalable groups, {category: frozen groups}) read off the module's structure."""
    rescalable, frozen = 0, {}
    layers = _layers(module)
    last = layers[-1][0]
    for layer, after in layers:
        if isinstance(layer, nn.BatchNorm2d) and not bn_kept:
            continue  # folded into the convolution before it, whose channels take its place
        if layer is last:
            category = "graph_output"
        elif isinstance(after, nn.BatchNorm2d) and bn_kept:
            category = "before_bn"
        elif isinstance(after, Clamp) and after.high is not None:
            category = "barrier"  # ReLU6
        else:
            rescalable += _width(layer)
            continue
        frozen[category] = frozen.get(category, 0) + _width(layer)
    return rescalable, frozen


# ------------------------------------------------------------------------------ exporters
def _export(module, exporter, dynamic, shape):
    x = torch.randn(shape)
    if exporter.startswith("legacy"):
        kw = dict(dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}) if dynamic else {}
        if exporter == "legacy_bn":
            kw.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
        return export_legacy(module, x, **kw)
    if not dynamic:
        return export_dynamo(module, x, optimize=exporter == "dynamo_fused")
    import contextlib
    import io
    import warnings
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (x,), dynamo=True, optimize=exporter == "dynamo_fused",
                                    input_names=["x"], output_names=["y"],
                                    dynamic_shapes=({0: torch.export.Dim("N", min=1, max=64)},))
    return program.model_proto


def _check(module, model, bn_kept, dynamic):
    assert model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_param") == dynamic
    out, report = rescale(model)
    rescalable, frozen = expected_counts(module, bn_kept)
    assert report.groups.rescalable == rescalable, report.frozen
    assert report.groups.frozen_by_category == frozen, report.frozen
    assert report.verification.passed
    assert_equivalent(model, out)  # a dynamic batch runs with a batch of 3 here
    return report


SHUFFLE_EXPORTS = [  # (exporter, split, shuffle style, dynamic batch)
    ("legacy_bn", "chunk", "view", False),
    ("legacy_bn", "chunk", "view", True),
    ("legacy_bn", "split", "reshape", True),
    ("legacy_fused", "chunk", "flatten", False),
    ("dynamo_bn", "chunk", "view", False),
    ("dynamo_bn", "split", "reshape", True),
    ("dynamo_fused", "chunk", "flatten", True),
]


@pytest.mark.parametrize("exporter,split,style,dynamic", SHUFFLE_EXPORTS,
                         ids=["-".join(map(str, c)) for c in SHUFFLE_EXPORTS])
def test_shufflenet_block_rescales_as_its_module_says(exporter, split, style, dynamic):
    module = _shufflenet(split, style)
    model = _export(module, exporter, dynamic, (1, 3, 16, 16))
    ops = [n.op_type for n in model.graph.node]
    assert "Transpose" in ops  # the shuffle is there
    bn_kept = "BatchNormalization" in ops
    assert bn_kept == exporter.endswith("_bn")
    if exporter == "dynamo_bn":
        assert "SplitToSequence" in ops  # how this exporter writes chunk and split
    if exporter == "legacy_bn" and dynamic:
        assert "Shape" in ops  # the Reshape targets are computed
    report = _check(module, model, bn_kept, dynamic)
    assert not report.barrier_ops


CLAMP_EXPORTS = [  # (exporter, dynamic batch, a ReLU6 after the first convolution)
    ("legacy_bn", False, False),
    ("legacy_fused", True, True),
    ("dynamo_bn", True, False),
    ("dynamo_fused", False, False),
    ("dynamo_bn", False, True),
]


@pytest.mark.parametrize("exporter,dynamic,relu6", CLAMP_EXPORTS, ids=["-".join(map(str, c)) for c in CLAMP_EXPORTS])
def test_clamp_network_rescales_as_its_module_says(exporter, dynamic, relu6):
    module = _clamp_net(relu6)
    model = _export(module, exporter, dynamic, (1, 3, 8, 8))
    ops = [n.op_type for n in model.graph.node]
    assert "Clip" in ops
    report = _check(module, model, "BatchNormalization" in ops, dynamic)
    assert bool(report.barrier_ops) == relu6
