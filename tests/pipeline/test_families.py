"""Real architectures from real exporters: group counts, training-mode BN, barriers, folding."""

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from support.nets import Net
from onnx_pathcond import rescale
from onnx_pathcond.api import analyse_model
from support import repo

torch = pytest.importorskip("torch")
zoo = pytest.importorskip("models.zoo")
nn = torch.nn

with open(repo.path("models", "MANIFEST.json")) as f:
    MANIFEST = json.load(f)


def expected_groups(family):
    """Sizes of the rescalable groups, read off the PyTorch module (not from the tool).

    A group is a channel of a neuron layer (conv / linear / BN output followed by a ReLU-like
    op); channels tied by identity shortcuts form one group whose size is the number of tensors
    created along that residual stream. Multiset {group size: count}.
    """
    module, _ = zoo.build(family)
    sizes = Counter()
    if family in ("mlp", "mlp_unbalanced"):
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        for lin in linears[:-1]:
            sizes[1] += lin.out_features
    elif family == "cnn" or family == "vgg_bn":
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        sizes[1] += sum(c.out_channels for c in convs) + sum(l.out_features for l in linears[:-1])
    elif family == "conv1d":
        sizes[1] += sum(c.out_channels for c in module.modules() if isinstance(c, nn.Conv1d))
    elif family == "resnet":
        stream_width, stream_size = module.conv1.out_channels, 1
        for block in (module.layer1, module.layer2, module.layer3):
            sizes[1] += block.conv1.out_channels  # the block's inner layer
            if isinstance(block.shortcut, nn.Identity):
                stream_size += 1  # conv2 (+BN) joins the stream
            else:  # projection: the old stream ends, a new one starts with conv2 and the shortcut
                sizes[stream_size] += stream_width
                stream_width, stream_size = block.conv2.out_channels, 2
        sizes[stream_size] += stream_width
    elif family == "unet":
        for part in (module.enc1, module.enc2, module.dec):
            sizes[1] += next(m for m in part if isinstance(m, nn.Conv2d)).out_channels
        sizes[1] += module.up.out_channels
    elif family == "densenet":
        # Features feed BatchNorms (their channels are not neurons); each BN's output is one.
        sizes[1] += sum(m.num_features for m in module.modules() if isinstance(m, nn.BatchNorm2d)
                        and m is not module.stem_bn)
        sizes[1] += module.trans_conv.out_channels
    elif family == "mobilenet":
        sizes[1] += module.stem[0].out_channels
        for block in (module.block1, module.block2):
            sizes[1] += block.dw.out_channels + block.pw.out_channels
    elif family == "mobilenet_relu6":
        pass  # every activation is a ReLU6 (Clip): nothing can move
    elif family == "shufflenet":
        # every conv is followed by its BN: the BN's channels (or, folded, the conv's) are the
        # neurons, one group each (the channel shuffles only permute them)
        sizes[1] += sum(m.num_features for m in module.modules() if isinstance(m, nn.BatchNorm2d))
    elif family == "preact_resnet":
        # the residual streams feed BatchNorms (frozen); each BN's output is a neuron (a folded
        # bn2 leaves its conv1's channels in its place, as many)
        sizes[1] += sum(m.num_features for m in module.modules() if isinstance(m, nn.BatchNorm2d))
    return dict(sizes)


def tool_groups(path):
    _, _, groups = analyse_model(onnx.load(path))
    return dict(Counter(groups.size.tolist()))


TORCH_ENTRIES = [e for e in MANIFEST if e["exporter"] != "onnx.helper"]


@pytest.mark.parametrize("entry", TORCH_ENTRIES, ids=[e["file"] for e in TORCH_ENTRIES])
def test_group_counts_follow_the_architecture(entry):
    assert tool_groups(repo.path("models", entry["file"])) == expected_groups(entry["family"])


BN_KEPT = [e for e in MANIFEST if e["has_batchnorm_nodes"] and e["names_match_state_dict"]]


@pytest.mark.parametrize("entry", BN_KEPT, ids=[e["file"] for e in BN_KEPT])
def test_training_mode_equivalence_after_loading_back_by_name(entry):
    path = repo.path("models", entry["file"])
    rescaled, report = rescale(path)
    original = onnx.load(path)
    before, shape = zoo.build(entry["family"], seed=1)
    after, _ = zoo.build(entry["family"], seed=2)
    loaded_before = zoo.load_onnx_weights_into(before, original)
    loaded_after = zoo.load_onnx_weights_into(after, rescaled)
    assert set(loaded_before) == set(loaded_after)
    changed = [r.name for r in report.rewritten]
    assert set(changed) <= set(loaded_after), "a rescaled tensor would not load back by name"
    before.train()
    after.train()
    x = torch.randn((8,) + tuple(shape[1:]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ya, yb = before(x), after(x)
    scale = ya.abs().max().item()
    assert (ya - yb).abs().max().item() <= 1e-5 * scale
    if report.groups.rescalable:
        assert changed  # the check above is not vacuous


@pytest.mark.parametrize("entry", [e for e in TORCH_ENTRIES if e["has_batchnorm_nodes"] is False
                                   and e["family"] in zoo.BN_FAMILIES], ids=lambda e: e["file"])
def test_folded_batchnorm_is_reported(entry):
    _, report = rescale(repo.path("models", entry["file"]), verify_output=False)
    assert report.exporter.folded_batchnorm
    assert any("BatchNorm" in w for w in report.warnings)


@pytest.mark.parametrize("file", ["mlp.onnx", "resnet.legacy_bn.onnx", "vgg_bn.dynamo_bn.onnx"])
def test_no_folding_warning_where_bn_is_kept(file):
    _, report = rescale(repo.path("models", file), verify_output=False)
    assert not report.exporter.folded_batchnorm
    assert not any("BatchNorm" in w for w in report.warnings)


# ------------------------------------------------------------------------------------ barriers
def _barrier_net(kind):
    """x -> conv A -> relu -> conv B -> [barrier] -> conv C -> relu -> conv D (output)."""
    net = Net([1, 2, 4, 4], seed=3, opset=20)
    a = net.relu(net.conv(net.x, 2, 3, 1))
    b = net.conv(a, 3, 4, 1)
    if kind == "relu6":
        lo, hi = net.param([], "lo", value=0.0), net.param([], "hi", value=6.0)
        b = net.node("Clip", [b, lo, hi])
    elif kind == "sigmoid":
        b = net.node("Sigmoid", [b])
    elif kind == "gelu":
        b = net.node("Gelu", [b])
    elif kind == "gelu_erf":  # how exporters without a Gelu op write it: x * 0.5 * (1 + erf(x / √2))
        half = net.param([], "half", value=0.5)
        one = net.param([], "one", value=1.0)
        root2 = net.param([], "root2", value=np.sqrt(2.0))
        e = net.node("Erf", [net.node("Div", [b, root2])])
        b = net.node("Mul", [net.node("Mul", [b, half]), net.node("Add", [e, one])])
    elif kind == "output":
        b = net.relu(b)
    c = net.relu(net.conv(b, 4, 5, 1))
    d = net.conv(c, 5, 2, 1)
    return net.model(d, b) if kind == "output" else net.model(d)


@pytest.mark.parametrize("kind,op", [("relu6", "Clip"), ("sigmoid", "Sigmoid"), ("gelu", "Gelu"),
                                     ("gelu_erf", "Erf"), ("output", None)])
def test_barrier_freezes_exactly_the_groups_that_reach_it(kind, op):
    model = _barrier_net(kind)
    after, report = rescale(model)
    frozen = {f.tensor: f for f in report.frozen}
    # conv B's 4 channels reach the barrier; conv D's 2 channels are the graph output.
    conv_b = [n for n in model.graph.node if n.op_type == "Conv"][1].output[0]
    conv_d = model.graph.output[0].name
    assert report.groups.rescalable == 3 + 5  # conv A and conv C stay free
    assert report.groups.frozen == 4 + 2
    assert frozen[conv_b].groups == 4
    reason = frozen[conv_b].reason
    assert (op in reason) if op else ("graph output" in reason)
    assert frozen[conv_d].reason.startswith("reaches graph output")
    if op:
        assert report.barrier_ops.get(op, 0) >= 1


def test_shared_weight_is_rescaled_consistently():
    # One Gemm weight used by two branches: both read the same tensor, so the branches' output
    # channels are tied (one scale each) and the result stays equivalent.
    net = Net([1, 5], seed=4)
    w = net.param([6, 5])
    b = net.param([6], "b")
    y1 = net.relu(net.node("Gemm", [net.x, w, b], transB=1))
    y2 = net.relu(net.node("Gemm", [net.node("Neg", [net.x]), w, b], transB=1))
    s = net.node("Add", [net.gemm(y1, 6, 3), net.gemm(y2, 6, 3)])
    model = net.model(s)
    _, _, groups = analyse_model(model)
    assert groups.count == 6 and sorted(set(groups.size.tolist())) == [2]
    after, report = rescale(model)
    assert report.verification.passed
    assert report.groups.rescalable == 6


def test_weight_also_read_by_a_barrier_is_frozen():
    net = Net([1, 5], seed=5)
    w = net.param([6, 5])
    y = net.relu(net.node("Gemm", [net.x, w], transB=1))
    side = net.node("ReduceSum", [net.node("Sigmoid", [w])], keepdims=0)
    y = net.node("Add", [net.gemm(y, 6, 1), side])
    model = net.model(y)
    _, report = rescale(model)
    reasons = [f.reason for f in report.frozen]
    assert any("also read by Sigmoid" in r for r in reasons)
