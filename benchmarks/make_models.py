"""Build the benchmark ONNX models into benchmarks/.cache/ (skipping files that exist).

    python benchmarks/make_models.py                 # all of them
    python benchmarks/make_models.py mlp_k3 resnet18 # only these
    python benchmarks/make_models.py --force         # rebuild even if present

Models (float32, batch 1 static, seeded random weights):

* ``mlp_k{3..8}``: MLP 3072-500×k-10, ReLU, ``Gemm`` nodes (legacy exporter).
* ``cifar_fcn``: fully convolutional CIFAR net 128-128-128-M-256-256-256-M-320-320-10 on
  3×32×32, 3×3 convs with ReLU, two 2×2 max-pools, last conv to 10 channels, global average
  pool, Flatten; no BatchNorm.
* ``vgg16``: torchvision's VGG-16 layout (13 3×3 convs + ReLU, 5 max-pools, adaptive average
  pool 7×7, classifier 25088-4096-4096-1000 with ReLU), 138 M parameters, 528 MB (legacy).
* ``resnet18``, ``resnet50``: torchvision-layout ResNets (written here: torchvision is not a
  dependency) on 1×3×224×224, BatchNorm kept (dynamo exporter, ``optimize=False``; legacy with
  ``TrainingMode.PRESERVE`` and no constant folding if dynamo fails).

Weights: Kaiming-uniform (ReLU gain) for conv / linear weights, uniform(±1/√fan_in) biases;
BatchNorm layers get random running statistics and affine parameters. Every file is checked
with ``onnx.checker`` and run in onnxruntime against the PyTorch module (eval mode).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

CACHE = Path(__file__).resolve().parent / ".cache"
SEED = 0


# ---------------------------------------------------------------------------- architectures
def _torch():
    import torch  # imported lazily: the benchmarks that only read the files do not need it

    return torch


def mlp(k: int):
    nn = _torch().nn
    layers: List = [nn.Flatten()]
    width = 3 * 32 * 32
    for _ in range(k):
        layers += [nn.Linear(width, 500), nn.ReLU()]
        width = 500
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers), (1, 3072)


def cifar_fcn():
    nn = _torch().nn
    plan = [128, 128, 128, "M", 256, 256, 256, "M", 320, 320]
    layers: List = []
    cin = 3
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, item, 3, padding=1), nn.ReLU()]
            cin = item
    layers += [nn.Conv2d(cin, 10, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), (1, 3, 32, 32)


def _resnet_classes():
    nn = _torch().nn

    def conv3x3(cin, cout, stride=1):
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

    def conv1x1(cin, cout, stride=1):
        return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, cin, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = conv3x3(cin, planes, stride)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = conv3x3(planes, planes)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, cin, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = conv1x1(cin, planes)
            self.bn1 = nn.BatchNorm2d(planes)
            self.conv2 = conv3x3(planes, planes, stride)  # stride on the 3x3 (torchvision v1.5)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv3 = conv1x1(planes, planes * 4)
            self.bn3 = nn.BatchNorm2d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self, block, layers, num_classes=1000):
            super().__init__()
            self.inplanes = 64
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            self.layer1 = self._make_layer(block, 64, layers[0])
            self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
            self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
            self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512 * block.expansion, num_classes)

        def _make_layer(self, block, planes, blocks, stride=1):
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                           nn.BatchNorm2d(planes * block.expansion))
            layers = [block(self.inplanes, planes, stride, downsample)]
            self.inplanes = planes * block.expansion
            layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
            return nn.Sequential(*layers)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(_torch().flatten(self.avgpool(x), 1))

    return BasicBlock, Bottleneck, ResNet


def vgg16():
    """torchvision's vgg16 layout (configuration D, no BatchNorm): 13 3×3 convs with ReLU in
    five stages of 64-128-256-512-512 channels, each ended by a 2×2 max-pool, an adaptive
    average pool to 7×7, and the classifier 25088→4096→4096→1000 with ReLU (its dropouts do
    nothing in eval mode and are left out)."""
    nn = _torch().nn
    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers: List = []
    cin = 3
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, item, 3, padding=1), nn.ReLU()]
            cin = item
    layers += [nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(),
               nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000)]
    return nn.Sequential(*layers), (1, 3, 224, 224)


def resnet18():
    BasicBlock, _, ResNet = _resnet_classes()
    return ResNet(BasicBlock, [2, 2, 2, 2]), (1, 3, 224, 224)


def resnet50():
    _, Bottleneck, ResNet = _resnet_classes()
    return ResNet(Bottleneck, [3, 4, 6, 3]), (1, 3, 224, 224)


# name -> (builder, exporter)
MODELS: Dict[str, Tuple[Callable, str]] = {
    **{f"mlp_k{k}": ((lambda k=k: mlp(k)), "legacy") for k in range(3, 9)},
    "cifar_fcn": (cifar_fcn, "legacy"),
    "resnet18": (resnet18, "dynamo"),
    "resnet50": (resnet50, "dynamo"),
    "vgg16": (vgg16, "legacy"),
}


def path_of(name: str) -> Path:
    return CACHE / f"{name}.onnx"


# ---------------------------------------------------------------------------- weights
def initialise(module, seed: int = SEED) -> None:
    """Kaiming-uniform (ReLU gain) weights, uniform(±1/√fan_in) biases, random BN statistics."""
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu", generator=g)
                if m.bias is not None:
                    fan_in = m.weight[0].numel()
                    m.bias.uniform_(-1 / fan_in ** 0.5, 1 / fan_in ** 0.5, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=g))
                m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    module.eval()


# ---------------------------------------------------------------------------- export
def _quiet():
    """Silence exporter chatter (the same helper as models/make_models.py, which imports torch)."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from models.make_models import _quiet as quiet

    return quiet()


def export_legacy(module, x, preserve_bn: bool = False):
    import onnx

    torch = _torch()
    buf = io.BytesIO()
    kw = {}
    if preserve_bn:
        kw = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
    with _quiet():
        torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], **kw)
    return onnx.load_from_string(buf.getvalue())


def export_dynamo(module, x):
    torch = _torch()
    with _quiet():
        prog = torch.onnx.export(module, (x,), dynamo=True, optimize=False,
                                 input_names=["x"], output_names=["y"])
    model = prog.model_proto
    for node in model.graph.node:  # stack traces embed absolute paths: drop them
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    return model


def check(model, module, shape) -> float:
    """onnx.checker + onnxruntime CPU vs PyTorch; returns the max error relative to the output scale."""
    import onnx
    import onnxruntime as ort

    torch = _torch()
    onnx.checker.check_model(model)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def build(name: str, force: bool = False) -> Path:
    import onnx

    path = path_of(name)
    if path.exists() and not force:
        print(f"  {name:10s} exists ({path.stat().st_size / 1e6:.1f} MB), skipped")
        return path
    torch = _torch()
    make, exporter = MODELS[name]
    module, shape = make()
    initialise(module)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    t0 = time.perf_counter()
    how = exporter
    if exporter == "dynamo":
        try:
            model = export_dynamo(module, x)
            how = "dynamo optimize=False"
        except Exception as e:  # noqa: BLE001 -- fall back, say why
            print(f"  {name}: dynamo export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); legacy")
            model = export_legacy(module, x, preserve_bn=True)
            how = "legacy PRESERVE"
    else:
        model = export_legacy(module, x)
    err = check(model, module, shape)
    if err > 1e-4:
        raise SystemExit(f"{name}: onnxruntime differs from PyTorch by {err:.3g} (relative)")
    ops: Dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    n_params = sum(p.numel() for p in module.parameters())
    print(f"  {name:10s} {how:22s} {n_params:>11,d} params  {path.stat().st_size / 1e6:7.1f} MB  "
          f"ort rel err {err:.1e}  {time.perf_counter() - t0:5.1f}s  "
          f"BN nodes {ops.get('BatchNormalization', 0)}")
    return path


def ensure(names, force: bool = False) -> List[Path]:
    return [build(n, force) for n in names]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help=f"models to build (default all): {', '.join(MODELS)}")
    ap.add_argument("--force", action="store_true", help="rebuild files that exist")
    args = ap.parse_args(argv)
    names = args.names or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)}")
    print(f"benchmark models in {CACHE}")
    ensure(names, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
