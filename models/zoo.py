"""Small, deterministic PyTorch ReLU networks used to produce the ONNX files in ``models/``.

Usage::

    from models.zoo import build, FAMILIES, load_onnx_weights_into
    module, input_shape = build("resnet")      # module is in eval mode, weights seeded

Every builder seeds torch before constructing its module, so ``build(name)`` returns the same
weights on every call (on a given torch version).  BatchNorm layers get non-trivial running
statistics and affine parameters, so exported files carry real BN numbers.

``load_onnx_weights_into(module, onnx_model)`` copies every ONNX initializer whose name is a
key of ``module.state_dict()`` back into the module (with a shape check) and returns the names
it loaded: used for a PyTorch round trip of rescaled weights.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "FAMILIES",
    "BN_FAMILIES",
    "build",
    "randomize_batchnorm",
    "load_onnx_weights_into",
]

SEED = 0


# ----------------------------------------------------------------------------------------------
# families without BatchNorm
# ----------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Linear-ReLU stack; ``widths`` includes input and output widths."""

    def __init__(self, widths):
        super().__init__()
        layers: List[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv(1->8)-ReLU-MaxPool-Conv(8->16)-ReLU-MaxPool-Flatten-Linear(784->32)-ReLU-Linear(32->10)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(16 * 7 * 7, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


class Conv1dNet(nn.Module):
    """1-D conv net on (N, 4, 64): strided, dilated and grouped convs, avg pool, mean over length."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 16, 5, stride=2, padding=2)  # L 64 -> 32
        self.conv2 = nn.Conv1d(16, 16, 3, dilation=2, padding=2)  # L 32 -> 32
        self.pool = nn.AvgPool1d(2)  # L 32 -> 16
        self.conv3 = nn.Conv1d(16, 8, 3, padding=1, groups=2)  # L 16 -> 16, 2 groups
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.pool(x)
        x = F.relu(self.conv3(x))
        x = x.mean(-1)  # global mean over length
        return self.fc(x)


# ----------------------------------------------------------------------------------------------
# families with BatchNorm
# ----------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem conv-BN-ReLU, blocks 16->16, 16->32 (stride 2, projection), 32->32, global pool, fc."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = BasicBlock(32, 32)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _conv_bn_relu(cin, cout, **kw):
    return [nn.Conv2d(cin, cout, 3, padding=1, **kw), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGGBN(nn.Module):
    """[Conv-BN-ReLU]x2 (3->16->16), MaxPool, [Conv-BN-ReLU]x2 (16->32->32), MaxPool, fc 2048-64-10.

    Convs keep their bias (as torchvision's vgg*_bn does), so a BN follows a biased conv here.
    """

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(3, 16),
            *_conv_bn_relu(16, 16),
            nn.MaxPool2d(2),
            *_conv_bn_relu(16, 32),
            *_conv_bn_relu(32, 32),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 8 * 8, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class SmallUNet(nn.Module):
    """enc1 (3->8) / MaxPool / enc2 (8->16) / ConvTranspose (16->8, x2) / cat enc1 / dec (16->8) / 1x1 head (8->2)."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(*_conv_bn_relu(3, 8, bias=False))
        self.down = nn.MaxPool2d(2)
        self.enc2 = nn.Sequential(*_conv_bn_relu(8, 16, bias=False))
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Sequential(*_conv_bn_relu(16, 8, bias=False))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.down(e1))
        u = self.up(e2)
        d = self.dec(torch.cat([u, e1], dim=1))
        return self.head(d)


class DenseLayer(nn.Module):
    """Pre-activation BN-ReLU-Conv3x3 producing ``growth`` channels, concatenated to its input."""

    def __init__(self, cin, growth):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        new = self.conv(F.relu(self.norm(x)))
        return torch.cat([x, new], dim=1)


class SmallDenseNet(nn.Module):
    """Stem conv-BN-ReLU (3->8), 3 dense layers (growth 4: 8->20), transition BN-ReLU-1x1 (20->10)-AvgPool2,
    global average pool (``F.adaptive_avg_pool2d`` + ``view(N, -1)``), fc 10->10."""

    def __init__(self, num_classes=10, growth=4, n_layers=3):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        c = 8
        layers = []
        for _ in range(n_layers):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.block = nn.Sequential(*layers)
        self.trans_bn = nn.BatchNorm2d(c)
        self.trans_conv = nn.Conv2d(c, c // 2, 1, bias=False)
        self.trans_pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(c // 2, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem_conv(x)))
        x = self.block(x)
        x = self.trans_pool(self.trans_conv(F.relu(self.trans_bn(x))))
        x = F.adaptive_avg_pool2d(x, 1)
        x = x.view(x.size(0), -1)  # shape-dependent reshape on purpose
        return self.fc(x)


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin, cout, stride, act):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = act()
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = act()

    def forward(self, x):
        x = self.act1(self.bn1(self.dw(x)))
        return self.act2(self.bn2(self.pw(x)))


class SmallMobileNet(nn.Module):
    """Stem conv (3->16, stride 2)-BN-act, 2 depthwise-separable blocks (16->32, 32->64 stride 2),
    global average pool (``x.mean([2, 3])``), fc 64->10.  ``act`` is ``nn.ReLU`` or ``nn.ReLU6``."""

    def __init__(self, act=nn.ReLU, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            act(),
        )
        self.block1 = DepthwiseSeparable(16, 32, 1, act)
        self.block2 = DepthwiseSeparable(32, 64, 2, act)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        x = x.mean([2, 3])
        return self.fc(x)


def _conv_bn(cin, cout, kernel=1, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU()] if relu else layers


def channel_shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleDown(nn.Module):
    """ShuffleNet v2 stride-2 unit: two branches read the input (dw3x3-BN, 1x1-BN-ReLU and
    1x1-BN-ReLU, dw3x3-BN, 1x1-BN-ReLU), concatenated, channels shuffled."""

    def __init__(self, cin, cout):
        super().__init__()
        half = cout // 2
        self.branch1 = nn.Sequential(*_conv_bn(cin, cin, 3, 2, groups=cin, relu=False), *_conv_bn(cin, half))
        self.branch2 = nn.Sequential(*_conv_bn(cin, half), *_conv_bn(half, half, 3, 2, groups=half, relu=False),
                                     *_conv_bn(half, half))

    def forward(self, x):
        return channel_shuffle(torch.cat((self.branch1(x), self.branch2(x)), dim=1), 2)


class ShuffleSplit(nn.Module):
    """ShuffleNet v2 stride-1 unit: ``chunk`` the channels in two halves, one through the branch
    (1x1-BN-ReLU, dw3x3-BN, 1x1-BN-ReLU), concatenated with the other, channels shuffled."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.branch2 = nn.Sequential(*_conv_bn(half, half), *_conv_bn(half, half, 3, groups=half, relu=False),
                                     *_conv_bn(half, half))

    def forward(self, x):
        left, right = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((left, self.branch2(right)), dim=1), 2)


class SmallShuffleNet(nn.Module):
    """Stem conv3x3 (3->16, stride 2)-BN-ReLU, a stride-2 unit (16->32), two stride-1 units (32),
    conv1x1 (32->64)-BN-ReLU, global average pool, fc 64->10."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, 16, 3, 2))
        self.stage = nn.Sequential(ShuffleDown(16, 32), ShuffleSplit(32), ShuffleSplit(32))
        self.head = nn.Sequential(*_conv_bn(32, 64))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.head(self.stage(self.stem(x)))
        return self.fc(x.mean([2, 3]))

    def expected_groups(self, fold_batchnorm):
        """(rescalable groups, {reason class: frozen groups}), from the architecture: every
        convolution is followed by its BatchNorm. Kept, the BatchNorm's channels are the
        neurons (the shuffle only permutes them) and the convolution's feed it; folded, the
        convolution's channels are the neurons. The classifier's outputs are the graph output."""
        convs = sum(m.out_channels for m in self.modules() if isinstance(m, nn.Conv2d))
        bns = sum(m.num_features for m in self.modules() if isinstance(m, nn.BatchNorm2d))
        frozen = {"graph_output": self.fc.out_features}
        if fold_batchnorm:
            return convs, frozen
        frozen["before_bn"] = convs
        return bns, frozen


class PreActBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 added to the input (or to a
    1x1 projection of the first BN-ReLU when the shape changes)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class SmallPreActResNet(nn.Module):
    """Stem conv3x3 (3->16), pre-activation blocks 16->16 and 16->32 (stride 2, projection),
    final BN-ReLU, global average pool, fc 32->10. Every BatchNorm but the blocks' second one
    reads a residual stream (a sum), not a convolution."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.layer1 = PreActBlock(16, 16)
        self.layer2 = PreActBlock(16, 32, stride=2)
        self.bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.conv1(x)))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def expected_groups(self, fold_batchnorm):
        """(rescalable groups, {reason class: frozen groups}), from the architecture.

        Residual streams: the stem's channels and layer1's conv2 (tied by the identity
        shortcut) feed layer1.bn1 and layer2.bn1; layer2's conv2 and projection (tied by the
        sum) feed the final BN. They feed BatchNorms: frozen (`before_bn`). Each BN-ReLU is
        followed by convolutions: its channels are neurons. A block's conv1 feeds its bn2:
        frozen, and bn2's channels are neurons -- unless the exporter folds bn2 into conv1
        (the only BatchNorms that directly follow a convolution read by nothing else: the stem
        conv is also the identity shortcut), which leaves conv1's channels as the neurons.
        """
        blocks = (self.layer1, self.layer2)
        streams = self.conv1.out_channels + self.layer2.conv2.out_channels
        neurons_after_conv1 = sum((b.conv1.out_channels if fold_batchnorm else b.bn2.num_features) for b in blocks)
        rescalable = sum(b.bn1.num_features for b in blocks) + neurons_after_conv1 + self.bn.num_features
        frozen = {"graph_output": self.fc.out_features, "before_bn": streams}
        if not fold_batchnorm:
            frozen["before_bn"] += sum(b.conv1.out_channels for b in blocks)
        return rescalable, frozen


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------

# name -> (constructor, example input shape incl. batch 1, has BatchNorm)
_REGISTRY: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...], bool]] = {
    "mlp": (lambda: MLP([784, 512, 256, 10]), (1, 784), False),
    # widths 16-1024-16-512-10: 64x expansions and contractions, kept small (<200 kB) on purpose
    "mlp_unbalanced": (lambda: MLP([16, 1024, 16, 512, 10]), (1, 16), False),
    "cnn": (SmallCNN, (1, 1, 28, 28), False),
    "conv1d": (Conv1dNet, (1, 4, 64), False),
    "resnet": (SmallResNet, (1, 3, 32, 32), True),
    "vgg_bn": (VGGBN, (1, 3, 32, 32), True),
    "unet": (SmallUNet, (1, 3, 32, 32), True),
    "densenet": (SmallDenseNet, (1, 3, 32, 32), True),
    "mobilenet": (lambda: SmallMobileNet(nn.ReLU), (1, 3, 32, 32), True),
    "mobilenet_relu6": (lambda: SmallMobileNet(nn.ReLU6), (1, 3, 32, 32), True),
    "shufflenet": (SmallShuffleNet, (1, 3, 32, 32), True),
    "preact_resnet": (SmallPreActResNet, (1, 3, 32, 32), True),
}

FAMILIES: Tuple[str, ...] = tuple(_REGISTRY)
BN_FAMILIES: Tuple[str, ...] = tuple(n for n, (_, _, bn) in _REGISTRY.items() if bn)


def randomize_batchnorm(module: nn.Module, seed: int = SEED) -> None:
    """Give every BatchNorm layer non-trivial statistics and affine parameters (deterministic)."""
    g = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=g))
                if m.affine:
                    m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=g))
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def build(name: str, seed: int = SEED) -> Tuple[nn.Module, Tuple[int, ...]]:
    """Return ``(module, example_input_shape)``; the module is in eval mode with seeded weights."""
    try:
        ctor, shape, has_bn = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None
    torch.manual_seed(seed)
    module = ctor()
    if has_bn:
        randomize_batchnorm(module, seed)
    module.eval()
    return module, tuple(shape)


# ----------------------------------------------------------------------------------------------
# ONNX -> PyTorch round trip
# ----------------------------------------------------------------------------------------------


def load_onnx_weights_into(module: nn.Module, onnx_model: Union["onnx.ModelProto", str]) -> List[str]:  # noqa: F821
    """Copy every ONNX initializer whose name is a key of ``module.state_dict()`` into ``module``.

    ``onnx_model`` is a ``ModelProto`` or a path.  Shapes must match exactly (``ValueError``
    otherwise); values are cast to the dtype of the state_dict entry.  Returns the names loaded,
    in initializer order.  Initializers with other names (e.g. ``onnx::Conv_17`` from BN folding)
    are ignored: check the returned list against what you expect to have been loaded.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(str(onnx_model))
    state = module.state_dict(keep_vars=True)
    loaded: List[str] = []
    with torch.no_grad():
        for init in onnx_model.graph.initializer:
            if init.name not in state:
                continue
            target = state[init.name]
            arr = numpy_helper.to_array(init)
            if tuple(arr.shape) != tuple(target.shape):
                raise ValueError(
                    f"initializer {init.name!r} has shape {tuple(arr.shape)}, "
                    f"state_dict entry has {tuple(target.shape)}"
                )
            target.copy_(torch.from_numpy(np.array(arr, copy=True)).to(target.dtype))
            loaded.append(init.name)
    return loaded
