"""--bn-statistics: a BatchNormalization's input channel carries its scale in the BN's running
statistics (mean ↦ λ·mean, var ↦ λ²·(var + ε) − ε).

Checked here, independently of the tool's own reasoning:

* group counts of a RepVGG-style network and a pre-activation ResNet, both exporters, with the
  option off and on, derived from the PyTorch modules;
* equivalence with onnxruntime in inference; in training mode, the rescaled module loaded back
  by name computes exactly what the original computes with each BN channel's ε replaced by
  ε/λ² (the derivation of the README), and stays within the README's bound of the original;
  momentum updates of the running statistics keep the two equivalent in inference;
* diag(G) against path enumeration, and the criterion's rescaled value against the path
  enumeration of the rescaled model (which fails if γ's entry were not outgoing from the BN's
  input group); the onnxruntime backend against numpy;
* float16, bfloat16 and float64 weights; running variances that would turn negative; tensors
  shared between BatchNorms; the training-form BatchNormalization still a barrier.
"""

from __future__ import annotations

import copy
import functools
import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from support.bruteforce import bruteforce_diag_g
from support.builders import dead_channel_bn_net
from support.checks import assert_equivalent, run
from support.nets import Net
from onnx_pathcond import bounds, rescale
from onnx_pathcond.api import analyse_model
from onnx_pathcond.stats import diag_g_by_tensor

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional
from models.make_models import export_dynamo, export_legacy  # noqa: E402
from models.zoo import PreActBlock, load_onnx_weights_into, randomize_batchnorm  # noqa: E402

EPS = 1e-5  # PyTorch's BatchNorm default, which both exporters write


# ------------------------------------------------------------------------------ PyTorch models
class RepVGGBlock(nn.Module):
    """RepVGG's training-time block: BN(conv3x3) + BN(conv1x1) (+ BN(x) when shapes allow), ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv3 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))
        if self.identity is not None:
            y = y + self.identity(x)  # BatchNorm on the previous block's ReLU output
        return F.relu(y)


class TinyRepVGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 16, 2), RepVGGBlock(16, 16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem_bn(self.stem_conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyPreActResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(PreActBlock(8, 8), PreActBlock(8, 16, 2))
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def repvgg_groups(m: TinyRepVGG, bn_statistics: bool) -> dict:
    """Group sizes read off the module: every conv output and the stem BN's output are
    neurons; a block's output ties its 2 or 3 branches. Without the option a channel that
    feeds a BatchNorm (every conv output; the stream before a block with an identity BN)
    is frozen."""
    sizes = Counter()
    blocks = list(m.blocks)

    def feeds_identity_bn(k):  # the stream entering block k
        return k < len(blocks) and blocks[k].identity is not None

    if bn_statistics or not feeds_identity_bn(0):
        sizes[1] += m.stem_bn.num_features
    if bn_statistics:
        sizes[1] += m.stem_conv.out_channels + sum(b.conv3.out_channels + b.conv1.out_channels for b in blocks)
    for k, b in enumerate(blocks):
        if bn_statistics or not feeds_identity_bn(k + 1):
            sizes[2 + (b.identity is not None)] += b.conv3.out_channels
    return dict(sizes)


def preact_groups(m: TinyPreActResNet, bn_statistics: bool) -> dict:
    """Every BN output (ReLU, then a conv or the head) is a neuron. The residual stream (the
    tensors added along it) and each block's conv1 output feed BatchNorms: frozen without the
    option, groups with it."""
    sizes = Counter()
    sizes[1] += sum(bn.num_features for bn in m.modules() if isinstance(bn, nn.BatchNorm2d))
    if bn_statistics:
        sizes[1] += sum(b.conv1.out_channels for b in m.blocks)
        width, size = m.stem.out_channels, 1
        for b in m.blocks:
            if b.shortcut is None:
                size += 1  # conv2 joins the stream
            else:  # the stream ends in bn1; conv2 and the shortcut start the next one
                sizes[size] += width
                width, size = b.conv2.out_channels, 2
        sizes[size] += width
    return dict(sizes)


FAMILIES = {"repvgg": (TinyRepVGG, repvgg_groups), "preact": (TinyPreActResNet, preact_groups)}
EXPORTERS = {
    "legacy": lambda m, x: export_legacy(m, x, training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False),
    "dynamo": lambda m, x: export_dynamo(m, x, optimize=False),
}
SHAPE = (1, 3, 8, 8)


def build(family, seed=0):
    torch.manual_seed(seed)
    module = FAMILIES[family][0]()
    randomize_batchnorm(module, seed)
    return module.eval()


@functools.lru_cache(maxsize=None)
def exported(family, exporter):
    model = EXPORTERS[exporter](build(family), torch.randn(SHAPE))
    return model.SerializeToString()


def load(family, exporter):
    return onnx.load_from_string(exported(family, exporter))


CASES = [(f, e) for f in FAMILIES for e in EXPORTERS]


def _sizes(model, bn_statistics):
    _, _, groups = analyse_model(model, bn_statistics=bn_statistics)
    return dict(Counter(groups.size.tolist()))


# ------------------------------------------------------------------------------ group counts
@pytest.mark.parametrize("family,exporter", CASES)
def test_group_counts_follow_the_module(family, exporter):
    model, count = load(family, exporter), FAMILIES[family][1]
    for on in (False, True):
        assert _sizes(model, on) == count(build(family), on), f"bn_statistics={on}"


@pytest.mark.parametrize("family,exporter", CASES)
def test_report_says_what_the_option_frees_and_carries(family, exporter):
    model, count = load(family, exporter), FAMILIES[family][1]
    module = build(family)
    freed = sum(count(module, True).values()) - sum(count(module, False).values())
    assert freed > 0
    _, off = rescale(model, dry_run=True)
    assert off.bn_statistics.would_free == freed and off.bn_statistics.frozen_before_bn == freed
    assert f"--bn-statistics would make {freed} more groups rescalable" in off.summary()
    _, on = rescale(model, dry_run=True, bn_statistics=True)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    assert on.bn_statistics.enabled and on.bn_statistics.would_free == 0
    assert on.bn_statistics.carried_nodes == n_bn  # every BN of these nets reads a neuron
    assert on.bn_statistics.carried_groups == freed  # each freed group is some BN's input
    assert "before_bn" not in on.groups.frozen_by_category
    assert json.loads(on.to_json())["bn_statistics"]["carried_nodes"] == n_bn


# ------------------------------------------------------------------------------ inference
@pytest.mark.parametrize("family,exporter", CASES)
def test_inference_equivalence(family, exporter):
    model = load(family, exporter)
    after, report = rescale(model, bn_statistics=True)
    assert report.verification.passed
    assert_equivalent(model, after)  # onnxruntime, other inputs than the tool's check
    roles = Counter(r.role for r in report.rewritten)
    assert roles["bn_mean"] and roles["bn_var"] and roles["bn_scale"]
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for t in after.graph.initializer:
        if t.name.endswith("running_var"):
            assert np.all(numpy_helper.to_array(t) >= 0), t.name
            assert not np.array_equal(numpy_helper.to_array(t), before[t.name]), t.name


# ------------------------------------------------------------------------------ training mode
def _batch_norm_with_eps(bn, x, eps):
    """What a BatchNorm2d in training mode outputs, with a per-channel ε (no buffer updated)."""
    view = (1, -1, 1, 1)
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    x_hat = (x - mean.view(view)) / torch.sqrt(var.view(view) + eps.view(view))
    return x_hat * bn.weight.view(view) + bn.bias.view(view)


def _loaded_pair(family, exporter):
    """The original and the rescaled module, weights loaded back by name from the ONNX files,
    with the λ of every BN input channel: λ² = (var' + ε)/(var + ε)."""
    model = load(family, exporter)
    rescaled, report = rescale(model, bn_statistics=True)
    before, after = build(family, seed=1), build(family, seed=2)
    names_before = load_onnx_weights_into(before, model)
    names_after = load_onnx_weights_into(after, rescaled)
    assert set(names_before) == set(names_after)
    changed = {r.name for r in report.rewritten}
    assert changed and changed <= set(names_after), "a rescaled tensor would not load back by name"
    lam = {}
    for name, bn in before.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn_after = after.get_submodule(name)
            ratio = (bn_after.running_var.double() + EPS) / (bn.running_var.double() + EPS)
            lam[name] = torch.sqrt(ratio)
    return before, after, lam


def _bn_inputs(module, x):
    """The input of every BatchNorm2d of `module` (training mode) on the batch x."""
    seen = {}
    hooks = [bn.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0].detach()))
             for name, bn in module.named_modules() if isinstance(bn, nn.BatchNorm2d)]
    with torch.no_grad():
        module(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family,exporter", CASES)
def test_training_mode_is_the_original_with_eps_over_lambda_squared(family, exporter):
    before, after, lam = _loaded_pair(family, exporter)
    assert any(float((l - 1).abs().max()) > 0.05 for l in lam.values()), "no BN input was rescaled"
    x = torch.randn((16,) + SHAPE[1:], generator=torch.Generator().manual_seed(0))
    # The derivation: BN'(λx) = λ_out·[γ (x − μ)/√(σ² + ε/λ²) + β], the λ_out taken back by
    # the next layer: the rescaled network in training mode is the original network whose
    # BatchNorms use ε/λ² per channel.
    reference = copy.deepcopy(before).train()
    for name, bn in reference.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            eps = (EPS / lam[name] ** 2).float()
            bn.register_forward_hook(lambda m, i, o, eps=eps: _batch_norm_with_eps(m, i[0], eps))
    after.train()
    with torch.no_grad():
        expected, got = reference(x), after(x)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-5 * scale

    # Against the original: each BN channel's normalised output moves by the factor
    # √((σ² + ε)/(σ² + ε/λ²)), within ε·|1 − λ⁻²| / (2·min(σ² + ε, σ² + ε/λ²)) of 1 (README).
    inputs = _bn_inputs(copy.deepcopy(before).train(), x)
    bound = 0.0
    for name, xin in inputs.items():
        var = xin.double().var(dim=(0, 2, 3), unbiased=False)
        lam2 = lam[name] ** 2
        factor = torch.sqrt((var + EPS) / (var + EPS / lam2))
        limit = EPS * (1 - 1 / lam2).abs() / (2 * torch.minimum(var + EPS, var + EPS / lam2))
        assert bool(((factor - 1).abs() <= limit * (1 + 1e-9)).all()), name
        bound += float(limit.max())
    before.train()
    with torch.no_grad():
        original = before(x)
    difference = (got - original).abs().max().item() / original.abs().max().item()
    # First order, the relative deviations of the BatchNorms crossed add up (measured: 8e-5
    # against a sum of 1.3e-3 for the RepVGG net, 1.9e-4 against 3.5e-3 for the pre-activation
    # one, with λ between 0.15 and 4.6).
    assert difference <= bound + 1e-5, (difference, bound)


@pytest.mark.parametrize("family,exporter", [("repvgg", "legacy"), ("preact", "dynamo")])
def test_momentum_updates_keep_the_models_equivalent_in_inference(family, exporter):
    before, after, lam = _loaded_pair(family, exporter)
    x = torch.randn((16,) + SHAPE[1:], generator=torch.Generator().manual_seed(1))
    before.train(), after.train()
    with torch.no_grad():
        for _ in range(3):  # three momentum updates of every running mean and variance
            before(x), after(x)
    before.eval(), after.eval()
    probe = torch.randn((4,) + SHAPE[1:], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = before(probe), after(probe)
    assert (a - b).abs().max().item() <= 1e-4 * a.abs().max().item()
    for name, bn in before.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            new = after.get_submodule(name)
            assert bool((new.running_var >= 0).all())


# ------------------------------------------------------------------------------ brute force
def _tiny_repvgg(dtype=np.float32):
    """conv-BN-ReLU, then a RepVGG-style block BN(h) + BN(conv1x1(h)), ReLU, pooled into a Gemm."""
    net = Net([1, 2, 3, 3], seed=41, dtype=dtype)
    h = net.relu(net.bn(net.conv(net.x, 2, 2, 3, pad=1, bias=False), 2))
    y = net.node("Add", [net.bn(h, 2), net.bn(net.conv(h, 2, 2, 1, bias=False), 2)])
    y = net.node("Flatten", [net.node("GlobalAveragePool", [net.relu(y)])], axis=1)
    return net.model(net.gemm(y, 2, 2))


def _tiny_preact(dtype=np.float32):
    """conv, then BN-ReLU-conv with the identity shortcut, then BN-ReLU and a Gemm head."""
    net = Net([1, 2, 3, 3], seed=42, dtype=dtype)
    s = net.conv(net.x, 2, 2, 3, pad=1)
    s = net.node("Add", [s, net.conv(net.relu(net.bn(s, 2)), 2, 2, 3, pad=1)])
    y = net.node("Flatten", [net.node("GlobalAveragePool", [net.relu(net.bn(s, 2))])], axis=1)
    return net.model(net.gemm(y, 2, 2))


def _bn_mlp(dtype=np.float64, widths=(4, 5, 5, 3), seed=43):
    """Gemm-ReLU-BN blocks (BatchNorm on (N, C) features), ending with a Gemm."""
    net = Net([2, widths[0]], seed=seed, dtype=dtype)
    x = net.x
    for a, b in zip(widths[:-2], widths[1:-1]):
        x = net.bn(net.relu(net.gemm(x, a, b)), b)
    return net.model(net.gemm(x, widths[-2], widths[-1]))


TINY = {"repvgg": _tiny_repvgg, "preact": _tiny_preact, "mlp_float64": _bn_mlp}


def _pathcond(g_before, g_after):
    """F = p·log Σ g' − Σ log(g'/g) over the entries with g > 0 (docs/design.md §3), from
    diag(G) before and after a rescaling."""
    g0 = np.concatenate([g.ravel() for g in g_before.values()])
    g1 = np.concatenate([g_after[name].ravel() for name in g_before])
    keep = g0 > 0
    return keep.sum() * np.log(g1[keep].sum()) - np.log(g1[keep] / g0[keep]).sum(), keep.sum() * np.log(g0.sum())


@pytest.mark.parametrize("case", sorted(TINY))
def test_diag_g_matches_path_enumeration(case):
    model = TINY[case]()
    expected = bruteforce_diag_g(model)
    graph, analysis, _ = analyse_model(model, bn_statistics=True)
    got = diag_g_by_tensor(graph, analysis)
    for name, ref in expected.items():
        np.testing.assert_allclose(got[name], ref, rtol=1e-10, atol=1e-14, err_msg=name)
    assert all(not np.any(g) for name, g in got.items() if name not in expected)
    ort = diag_g_by_tensor(graph, analysis, backend="onnxruntime")
    assert set(ort) == set(got)
    for name in got:
        np.testing.assert_allclose(ort[name], got[name], rtol=1e-10, atol=1e-300, err_msg=name)


@pytest.mark.parametrize("case", sorted(TINY))
def test_criterion_after_rescaling_is_that_of_the_rescaled_model(case):
    # Every path product is unchanged, so diag(G) of the rescaled model, enumerated path by
    # path, gives F(u) without the tool's account of which groups each entry joins: a γ whose
    # entry a = γ/√(var+ε) were not also outgoing from the BN's input group would disagree.
    model = TINY[case]()
    after, report = rescale(model, bn_statistics=True)
    assert report.bn_statistics.carried_groups > 0 and report.verification.passed
    f_after, f_before = _pathcond(bruteforce_diag_g(model), bruteforce_diag_g(after))
    float64 = case.endswith("float64")
    # diag(G) entries within 1 ± δ (float32 statistics; δ = 0 in float64) move F by at most
    # p·log((1 + δ)/(1 − δ)) at any u
    delta = report.statistics.relative_error
    slack = report.criterion.entries * (np.log1p(delta) - np.log1p(-delta))
    assert abs(report.criterion.F_before - f_before) <= slack + 1e-10 * abs(f_before)
    assert abs(report.criterion.F_after - f_after) <= slack + (1e-10 if float64 else 1e-5) * abs(f_after) + 1e-6
    assert abs(report.criterion.F_after - report.criterion.F_before) > 1e-3 * abs(report.criterion.F_before)


# ------------------------------------------------------------------------------ dtypes
def _bfloat16(name, values):
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    return helper.make_tensor(name, TensorProto.BFLOAT16, list(np.shape(values)), rounded.tobytes(), raw=True)


def _bfloat16_bn_net():
    """A conv net in float32 whose BatchNorm parameters and statistics are stored in
    bfloat16 and reach the BN through Cast."""
    net = Net([1, 3, 5, 5], seed=44)
    x = net.x
    for cin, cout in ((3, 4), (4, 4)):
        x = net.relu(net.conv(x, cin, cout, 3, pad=1))
        inputs = [x]
        for role, values in (("gamma", net.rng.standard_normal(cout)), ("beta", 0.5 * net.rng.standard_normal(cout)),
                             ("mean", 0.3 * net.rng.standard_normal(cout)),
                             ("var", np.abs(net.rng.standard_normal(cout)) + 0.1)):
            name = net.name(role)
            net.inits.append(_bfloat16(name, values))
            inputs.append(net.node("Cast", [name], to=TensorProto.FLOAT))
        x = net.node("BatchNormalization", inputs, epsilon=EPS)
    x = net.node("Flatten", [net.node("GlobalAveragePool", [x])], axis=1)
    return net.model(net.gemm(x, 4, 2))


DTYPES = {
    "float16": (lambda: _tiny_preact(np.float16), 1e-2, np.float16),
    "bfloat16": (_bfloat16_bn_net, 5e-2, np.float32),
    "float64": (lambda: _bn_mlp(np.float64), 1e-9, np.float64),
}


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_weights_of_every_float_type(dtype):
    build_model, rtol, io_type = DTYPES[dtype]
    model = build_model()
    after, report = rescale(model, bn_statistics=True)
    assert report.bn_statistics.carried_groups > 0 and report.verification.passed
    before = {t.name: t for t in model.graph.initializer}
    for t in after.graph.initializer:
        assert t.data_type == before[t.name].data_type, t.name
    rewritten = {r.name: r.role for r in report.rewritten}
    assert {"bn_mean", "bn_var"} <= set(rewritten.values())
    new = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in after.graph.initializer}
    for name, role in rewritten.items():
        if role == "bn_var":
            assert np.all(new[name] >= 0)
    feeds = {model.graph.input[0].name: np.random.default_rng(5).standard_normal(
        [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(io_type)}
    a, b = (run(m, feeds)[0].astype(np.float64) for m in (model, after))
    assert np.abs(a - b).max() <= rtol * np.abs(a).max()


def test_float64_statistics_follow_the_producers_scale():
    # Gemm → ReLU → BN: the Gemm's bias is multiplied by λ of the BN's input channel, so the
    # running mean must be too, and var + ε by λ² (in float64 to rounding).
    model = _bn_mlp(np.float64)
    after, _ = rescale(model, bn_statistics=True)
    old = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    gemm_bias = {n.output[0]: n.input[2] for n in model.graph.node if n.op_type == "Gemm"}
    producer = {n.output[0]: n for n in model.graph.node}
    checked = 0
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        gemm_out = producer[node.input[0]].input[0]  # BN ← Relu ← Gemm
        lam = new[gemm_bias[gemm_out]] / old[gemm_bias[gemm_out]]
        mean, var = node.input[3], node.input[4]
        np.testing.assert_allclose(new[mean], lam * old[mean], rtol=1e-12)
        eps = float(np.float32(EPS))  # the attribute is a float32: ε as the model computes with it
        np.testing.assert_allclose(new[var] + eps, lam ** 2 * (old[var] + eps), rtol=1e-12)
        assert np.abs(lam - 1).max() > 1e-3
        checked += 1
    assert checked == 2


# ------------------------------------------------------------------------------ running variance
def _dead_channel_net():
    """8 BN channels, half of them never fired; λ of the first layer wanted down to 0.002."""
    return dead_channel_bn_net(6, 8, 3, seed=45, scale=10.0, variance=2.0, mean=0.3, eps=EPS)


def test_a_running_variance_never_turns_negative(monkeypatch):
    model = _dead_channel_net()
    var = next(n.input[4] for n in model.graph.node if n.op_type == "BatchNormalization")

    def variance(m):
        return numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == var)).astype(np.float64)

    # Without the bounds some variances turn negative: inference is still exact (only var + ε,
    # still positive, is used), which is why the bound is a choice, not a correction.
    with monkeypatch.context() as patch:
        patch.setattr(bounds, "solve_bounds", lambda graph, uses, groups: bounds.Bounds.none(groups.count))
        unbounded, free_report = rescale(model, bn_statistics=True, solver="exact")
    negative = variance(unbounded) < 0
    assert negative.sum() >= 2 and free_report.verification.passed
    for solver in ("cd", "exact"):
        after, report = rescale(model, bn_statistics=True, solver=solver)
        new = variance(after)
        assert np.all(new >= 0)
        # the channels that never fired (var = 0) may not shrink: there the bound holds
        assert report.solver.on_variance_bound >= 1
        assert report.solver.F_after <= report.solver.F_before
        # the bound costs something, so the unbounded optimum is lower
        assert report.solver.F_after >= free_report.solver.F_after - 1e-9 * abs(free_report.solver.F_after)
        assert report.verification.passed
        assert_equivalent(model, after)
    assert report.solver.converged and report.solver.kkt_residual < 1e-6


def test_the_variance_bound_is_the_exact_limit_of_each_channel():
    graph, analysis, groups = analyse_model(_dead_channel_net(), bn_statistics=True)
    var_use = next(u for u in analysis.uses if u.role == "bn_var")
    ids = groups.of_position[var_use.rows]  # the 8 BN input channels: their own groups
    box = bounds.solve_bounds(graph, analysis.uses, groups)
    var = np.r_[np.zeros(4), np.full(4, 2.0)]
    eps = float(np.float32(EPS))  # the node's epsilon attribute is a float32
    # λ²·(var + ε) − ε ≥ 0  ⟺  u = 2·log λ ≥ log(ε / (var + ε)); no upper limit
    np.testing.assert_allclose(box.lower[ids], np.log(eps / (var + eps)), rtol=0, atol=1e-8)
    assert np.all(box.lower[ids] >= np.log(eps / (var + eps)))  # inside, never outside
    assert np.all(np.isinf(box.upper[ids])) and box.variance[ids].all()
    others = np.setdiff1d(np.arange(groups.count), ids)
    assert np.all(np.isinf(box.lower[others])) and not box.variance[others].any()


# ------------------------------------------------------------------------------ shared tensors, barriers
def _two_bns(shared):
    """Gemm → ReLU → BN twice, the second BN reading the first one's tensor `shared`
    (var, or γ read as the other's running variance)."""
    net = Net([2, 4], seed=46)
    names = []
    x = net.x
    for k in range(2):
        x = net.relu(net.gemm(x, 4, 4))
        params = [net.param([4], "gamma", value=np.ones(4)), net.param([4], "beta", scale=0.5),
                  net.param([4], "mean", scale=0.3), net.param([4], "var", positive=True)]
        if k == 1 and shared == "var":
            params[3] = names[3]
        if k == 1 and shared == "gamma_as_var":
            params[3] = names[0]
        if k == 1 and shared == "zero_var":
            params[3] = names[3]
        names = params
        if k == 0 and shared == "zero_var":
            net.inits[-1].CopyFrom(numpy_helper.from_array(np.zeros(4, np.float32), params[3]))
        x = net.node("BatchNormalization", [x] + params, epsilon=EPS)
    return net.model(net.gemm(x, 4, 2))


@pytest.mark.parametrize("shared", ["var", "zero_var"])
def test_a_running_variance_shared_by_two_bns_ties_their_inputs(shared):
    model = _two_bns(shared)
    graph, analysis, groups = analyse_model(model, bn_statistics=True)
    first, second = [groups.of_position[u.rows] for u in analysis.uses if u.role == "bn_var"]
    assert np.all(first >= 0) and np.array_equal(first, second)
    after, report = rescale(model, bn_statistics=True)
    assert report.verification.passed
    assert_equivalent(model, after)


def test_ones_read_as_a_gamma_and_as_a_running_variance_are_frozen():
    model = _two_bns("gamma_as_var")
    after, report = rescale(model, bn_statistics=True)
    reasons = [f.reason for f in report.frozen]
    assert any("bn_scale and as bn_var" in r for r in reasons), reasons
    assert report.verification.passed
    assert_equivalent(model, after)


def test_training_form_batchnorm_stays_a_barrier():
    net = Net([2, 3, 4, 4], seed=47, opset=15)
    h = net.relu(net.conv(net.x, 3, 4, 3, pad=1))
    bn = [net.param([4], "gamma"), net.param([4], "beta"), net.param([4], "mean"),
          net.param([4], "var", positive=True)]
    y, _, _ = net.node("BatchNormalization", [h] + bn, n_out=3, epsilon=EPS, training_mode=1)
    model = net.model(net.conv(net.relu(y), 4, 2, 1))
    for on in (False, True):
        _, report = rescale(model, bn_statistics=on, dry_run=True)
        assert report.groups.rescalable == 0
        assert any("training form" in f.reason for f in report.frozen)


# ------------------------------------------------------------------------------ command line
def test_command_line_flag(tmp_path, invoke_cli):
    src = tmp_path / "in.onnx"
    onnx.save(load("preact", "legacy"), src)
    module = build("preact")
    freed = sum(preact_groups(module, True).values()) - sum(preact_groups(module, False).values())
    off = invoke_cli(src, tmp_path / "off.onnx")
    assert off.exit_code == 0, off.output
    assert f"--bn-statistics would make {freed} more groups rescalable" in off.output
    on = invoke_cli(src, tmp_path / "on.onnx", "--bn-statistics", "--report", tmp_path / "r.json")
    assert on.exit_code == 0, on.output
    assert "carry their scale in the running statistics" in on.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["bn_statistics"]["enabled"] and report["bn_statistics"]["carried_groups"] == freed
    assert report["verification"]["passed"]
    assert "--bn-statistics" in invoke_cli("--help").output
