"""onnx_pathcond.torch: a PyTorch module rescaled in place in one call, and rescaled ONNX files
loaded back by name. Every check of the module's outputs here is the test's own (a deep copy of
the module taken before, run in eval and in train mode with the same random stream), not the
submodule's."""

import copy
import sys
import warnings

import onnx
import pytest

import onnx_pathcond
from onnx_pathcond import InputError, ModelError, PathCondError, VerificationError

torch = pytest.importorskip("torch")
zoo = pytest.importorskip("models.zoo")
pt = pytest.importorskip("onnx_pathcond.torch")
nn = torch.nn
F = torch.nn.functional

RTOL = 1e-5  # float32, relative to each output's largest magnitude: the tool's own default


# ------------------------------------------------------------------------------------ helpers
def modes(module):
    return [(name, m.training) for name, m in module.named_modules()]


def state(module):
    """Every parameter and buffer, copied, by name."""
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def assert_same_state(module, saved):
    now = module.state_dict(keep_vars=True)
    assert set(now) == set(saved)
    for name, value in saved.items():
        assert torch.equal(now[name], value), f"{name} changed"


def outputs(module, x, train, seed=0):
    """Outputs of a copy of `module` (its buffers stay as they are) in one mode, the random
    stream seeded so that two modules draw the same dropout masks."""
    m = copy.deepcopy(module).train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        y = m(*x) if isinstance(x, tuple) else m(x)
    return y if isinstance(y, tuple) else (y,)


def assert_same_function(before, after, x, rtol=RTOL):
    for train in (False, True):
        for a, b in zip(outputs(before, x, train), outputs(after, x, train)):
            scale = a.abs().max().item()
            assert (a - b).abs().max().item() <= rtol * scale, "train" if train else "eval"


def changed_names(before, after):
    b, a = before.state_dict(), after.state_dict()
    return [k for k in b if not torch.equal(b[k], a[k])]


def export_legacy(module, x, path, **settings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (x,), str(path), dynamo=False, input_names=["x"], **settings)
    return str(path)


# ------------------------------------------------------------------------------------ small modules
class MixedModes(nn.Module):
    """Linear-BN-ReLU-Dropout-Linear-ReLU-Linear: train() and eval() both matter."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.drop = nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Dropout(0.3)
        self.fc2, self.fc3 = nn.Linear(12, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(self.drop(F.relu(self.bn(self.fc1(x)))))))


class Tied(nn.Module):
    """One Linear weight used by two parallel layers (`b.weight is a.weight`): their output
    channels share one scale each."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(5, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(F.relu(self.a(x))) + self.d(F.relu(self.b(-x)))


class PlainTensorWeight(nn.Module):
    """A hidden layer whose weight is a plain tensor attribute: neither a parameter nor a buffer."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.hidden = torch.randn(9, 7)
        self.fc3 = nn.Linear(9, 2)

    def forward(self, x):
        return self.fc3(F.relu(F.linear(F.relu(self.fc1(x)), self.hidden)))


class SigmoidWhenTraining(nn.Module):
    """A hidden activation that is a ReLU in eval mode (what the export shows) and a sigmoid in train mode."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.sigmoid(h) if self.training else F.relu(h))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fa, self.fb, self.out = nn.Linear(4, 6), nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, a, b):
        return self.out(F.relu(self.fa(a) + self.fb(b)))


class ConvBN(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        return self.head(F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))))


def conv_bn(seed=0):
    torch.manual_seed(seed)
    module = ConvBN()
    zoo.randomize_batchnorm(module, seed)
    return module.eval()


class Seq3D(nn.Module):
    """Linear layers on (N, T, C) inputs: the legacy exporter writes them as MatMul."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.c(F.relu(self.a(x)))


# ------------------------------------------------------------------------------------ rescale_module
ZOO_CASES = [("mlp", 1), ("mlp", 8), ("cnn", 8), ("resnet", 1), ("resnet", 8), ("unet", 1), ("densenet", 8)]


@pytest.mark.parametrize("family,batch", ZOO_CASES, ids=[f"{f}-batch{b}" for f, b in ZOO_CASES])
def test_zoo_module_is_rescaled_in_place(family, batch):
    module, shape = zoo.build(family)
    original = copy.deepcopy(module)
    found_modes = modes(module)
    parameters = {name: p for name, p in module.named_parameters()}
    x = torch.randn((batch,) + tuple(shape[1:]), generator=torch.Generator().manual_seed(1))

    result = pt.rescale_module(module, x)

    assert modes(module) == found_modes
    assert all(p is parameters[name] for name, p in module.named_parameters())  # in place: same objects
    for name, value in original.named_buffers():  # running statistics as they were
        assert torch.equal(dict(module.named_buffers())[name], value), name
    changed = changed_names(original, module)
    assert changed and set(changed) <= set(result.loaded)
    assert sorted(result.changed) == sorted(changed)
    assert {r.name for r in result.report.rewritten} <= set(result.loaded)
    for name in changed:  # the factor the result states is the one the tensor moved by
        old, new = original.state_dict()[name].double(), module.state_dict()[name].double()
        nonzero = old != 0
        assert result.max_abs_log_factor[name] == pytest.approx((new[nonzero] / old[nonzero]).log().abs().max().item(),
                                                                rel=1e-9, abs=1e-12)
    assert max(result.max_abs_log_factor.values()) > 0.01  # a real rescaling, not rounding
    assert_same_function(original, module, x)
    assert result.check.passed and set(result.check.max_rel) == {"eval", "train"}
    assert "loaded back by name" in result.summary()


def test_bn_statistics_loads_running_statistics_and_checks_train_mode_up_to_epsilon():
    # With bn_statistics the running mean and variance are rescaled and loaded back too; eval
    # mode stays exact, train mode moves by the ε effect (README, "BatchNorm statistics"),
    # which the check accepts up to its documented bound and no further.
    module, shape = zoo.build("resnet")
    original = copy.deepcopy(module)
    x = torch.randn((8,) + tuple(shape[1:]), generator=torch.Generator().manual_seed(1))
    result = pt.rescale_module(module, x, bn_statistics=True)
    moved = set(changed_names(original, module))
    assert any(name.endswith("running_var") for name in moved) and any(name.endswith("running_mean") for name in moved)
    assert result.check.train_rtol == onnx_pathcond.options.BN_STATISTICS_TRAIN_RTOL
    eval_before, eval_after = outputs(original, x, False)[0], outputs(module, x, False)[0]
    assert (eval_before - eval_after).abs().max().item() <= RTOL * eval_before.abs().max().item()
    train_before, train_after = outputs(original, x, True)[0], outputs(module, x, True)[0]
    train_difference = (train_before - train_after).abs().max().item() / train_before.abs().max().item()
    assert RTOL < train_difference <= result.check.train_rtol  # really moved by ε, within the bound
    assert result.check.max_rel["train"] == pytest.approx(train_difference, rel=1e-3)

    strict = copy.deepcopy(original)
    with pytest.raises(VerificationError, match="in train mode .*ε/λ²"):
        pt.rescale_module(strict, x, bn_statistics=True, check_rtol=RTOL)
    assert_same_state(strict, state(original))


def test_batchnorm_and_dropout_module_keeps_each_submodule_mode():
    torch.manual_seed(0)
    module = MixedModes().train()
    module.fc3.eval()  # a mix of modes, to be put back exactly
    zoo.randomize_batchnorm(module)
    original = copy.deepcopy(module)
    found_modes = modes(module)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(outputs(module, x, True, seed=0)[0], outputs(module, x, True, seed=1)[0])  # dropout acts
    torch.manual_seed(11)
    stream = torch.random.get_rng_state()

    result = pt.rescale_module(module, x)

    assert torch.equal(torch.random.get_rng_state(), stream)  # the caller's random stream is untouched
    assert modes(module) == found_modes
    assert torch.equal(module.bn.running_mean, original.bn.running_mean)
    assert torch.equal(module.bn.num_batches_tracked, original.bn.num_batches_tracked)
    assert "bn.weight" in result.changed and "fc1.weight" not in result.changed  # the channel before BN stays
    assert_same_function(original, module, x)


def test_tied_parameter_stays_tied_and_is_loaded_under_both_names():
    torch.manual_seed(0)
    module = Tied()
    original = copy.deepcopy(module)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    result = pt.rescale_module(module, x)
    assert module.b.weight is module.a.weight
    assert {"a.weight", "b.weight"} <= set(result.loaded)
    assert "a.weight" in changed_names(original, module)
    assert_same_function(original, module, x)


def test_two_inputs_given_as_a_tuple():
    torch.manual_seed(0)
    module = TwoInputs()
    original = copy.deepcopy(module)
    x = (torch.randn(5, 4), torch.randn(5, 3))
    result = pt.rescale_module(module, x)
    assert {"fa.weight", "fb.weight", "out.weight"} <= set(result.changed)
    assert_same_function(original, module, x)


def test_dynamo_exporter():
    module = conv_bn()
    original = copy.deepcopy(module)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    result = pt.rescale_module(module, x, exporter="dynamo")
    assert result.exporter == "dynamo"
    assert {"bn1.weight", "bn1.bias", "conv2.weight"} <= set(result.changed)
    assert_same_function(original, module, x)


def test_options_reach_the_tool():
    module = conv_bn()
    original = copy.deepcopy(module)
    x = torch.randn(2, 3, 6, 6)
    result = pt.rescale_module(module, x, solver="exact", max_iter=5, verify_output=False)
    assert result.report.solver.method != "coordinate-descent" and result.report.solver.sweeps <= 5
    assert result.report.verification is None
    assert result.check.rtol == 1e-5  # the float32 default when the tool's own check was off
    assert_same_function(original, module, x)


@pytest.mark.parametrize("options,error", [
    (dict(solver="newton"), InputError), (dict(dry_run=True), InputError), (dict(exporter="onnxscript"), InputError),
    (dict(check_rtol=float("nan")), InputError), (dict(no_such_option=1), InputError),
])
def test_bad_options_leave_the_module_untouched(options, error):
    module = conv_bn()
    saved, found_modes = state(module), modes(module)
    with pytest.raises(error):
        pt.rescale_module(module, torch.randn(1, 3, 6, 6), **options)
    assert_same_state(module, saved)
    assert modes(module) == found_modes


def test_bad_example_input():
    module = conv_bn()
    with pytest.raises(InputError, match="example_input"):
        pt.rescale_module(module, [torch.randn(1, 3, 6, 6), "not a tensor"])


def test_rescaled_tensor_that_is_no_parameter_or_buffer_is_refused():
    torch.manual_seed(0)
    module = PlainTensorWeight().train()
    saved, found_modes = state(module), modes(module)
    with pytest.raises(ModelError) as info:
        pt.rescale_module(module, torch.randn(4, 5))
    message = str(info.value)
    assert "\n" not in message and "not a parameter or buffer" in message and "nothing was changed" in message
    assert_same_state(module, saved)
    assert modes(module) == found_modes


def test_train_mode_mismatch_puts_the_weights_back():
    torch.manual_seed(0)
    module = SigmoidWhenTraining()
    saved, found_modes = state(module), modes(module)
    with pytest.raises(VerificationError, match="train mode") as info:
        pt.rescale_module(module, torch.randn(6, 4))
    assert "\n" not in str(info.value)
    assert_same_state(module, saved)
    assert modes(module) == found_modes
    # Without the check the same module is rescaled (the tool's eval-mode export is equivalent).
    result = pt.rescale_module(module, torch.randn(6, 4), check=False)
    assert result.check is None and result.changed


def test_export_failure_is_one_line_and_leaves_the_module_untouched():
    class Unexportable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return torch.linalg.cholesky(self.fc(x).T @ self.fc(x) + torch.eye(3))

    module = Unexportable()
    saved = state(module)
    with pytest.raises(pt.ExportError) as info:
        pt.rescale_module(module, torch.randn(4, 3))
    assert "\n" not in str(info.value) and "exporter" in str(info.value)
    assert isinstance(info.value, PathCondError)
    assert_same_state(module, saved)


# ------------------------------------------------------------------------------------ load_rescaled
def test_manual_round_trip_with_the_documented_export(tmp_path):
    module, shape = zoo.build("resnet")
    x = torch.randn((4,) + tuple(shape[1:]), generator=torch.Generator().manual_seed(5))
    path = str(tmp_path / "resnet.onnx")
    pt.export_module(module, torch.randn(shape), path)
    assert not changed_names(zoo.build("resnet")[0], module) and not module.training
    report = onnx_pathcond.rescale_file(path, str(tmp_path / "out.onnx"))  # as the CLI does
    target, _ = zoo.build("resnet", seed=7)  # other weights: everything must come from the file
    loaded = pt.load_rescaled(target, str(tmp_path / "out.onnx"))
    assert {r.name for r in report.rewritten} <= set(loaded)
    assert set(changed_names(module, target)) <= set(loaded)
    assert changed_names(module, target)
    assert_same_function(module, target, x)
    # A ModelProto works the same.
    again, _ = zoo.build("resnet", seed=8)
    assert pt.load_rescaled(again, onnx.load(str(tmp_path / "out.onnx"))) == loaded
    assert not changed_names(target, again)


def test_equal_tensors_stored_once_by_the_legacy_exporter_load_under_every_name(tmp_path):
    # Two BatchNorms with the same γ: the legacy exporter's default stores it once and names
    # the second with an Identity node. The tool rescales the stored one for both readers.
    module = conv_bn()
    with torch.no_grad():
        module.bn1.weight.fill_(1.5)
        module.bn2.weight.fill_(1.5)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(6))
    path = export_legacy(module, x[:1], tmp_path / "m.onnx", training=torch.onnx.TrainingMode.PRESERVE,
                         do_constant_folding=False)
    graph = onnx.load(path).graph
    assert "bn2.weight" not in {t.name for t in graph.initializer}
    assert any(n.op_type == "Identity" and n.output[0] == "bn2.weight" for n in graph.node)
    rescaled, report = onnx_pathcond.rescale(path)
    assert "bn1.weight" in {r.name for r in report.rewritten}
    target = conv_bn(seed=3)
    loaded = pt.load_rescaled(target, rescaled)
    assert {"bn1.weight", "bn2.weight"} <= set(loaded)
    assert {"bn1.weight", "bn2.weight"} <= set(changed_names(module, target))
    assert_same_function(module, target, x)


def test_folded_batchnorm_is_refused(tmp_path):
    module = conv_bn()
    path = export_legacy(module, torch.randn(1, 3, 6, 6), tmp_path / "folded.onnx")  # eval, constant folding
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)
    onnx_pathcond.rescale(path, output=str(tmp_path / "out.onnx"))
    target = conv_bn(seed=1)
    saved = state(target)
    with pytest.raises(ModelError, match="BatchNorm 'bn1' has no 'bn1.weight'") as info:
        pt.load_rescaled(target, str(tmp_path / "out.onnx"))
    assert "\n" not in str(info.value)
    assert_same_state(target, saved)


def test_transposed_linear_weight_under_a_generated_name(tmp_path):
    torch.manual_seed(0)
    module = Seq3D()
    x = torch.randn(2, 5, 6)
    # With constant folding, the legacy exporter stores the transposed weights as onnx::MatMul_*.
    folded = export_legacy(module, x, tmp_path / "folded.onnx")
    generated = [t.name for t in onnx.load(folded).graph.initializer if t.name.startswith("onnx::MatMul")]
    assert len(generated) == 2
    rescaled, _ = onnx_pathcond.rescale(folded)
    target = copy.deepcopy(module)
    saved = state(target)
    with pytest.raises(ModelError) as info:
        pt.load_rescaled(target, rescaled)
    assert any(f"'{name}'" in str(info.value) for name in generated) and "(transposed)" in str(info.value)
    assert_same_state(target, saved)
    # Left unrescaled, such copies equal a parameter's transpose and are no obstacle.
    assert set(pt.load_rescaled(copy.deepcopy(module), folded)) == {"a.bias", "c.bias"}
    # Without constant folding the weights keep their names (read through a Transpose node).
    kept = str(tmp_path / "kept.onnx")
    pt.export_module(module, x, kept)
    rescaled, report = onnx_pathcond.rescale(kept)
    target = copy.deepcopy(module)
    assert {"a.weight", "c.weight"} <= set(pt.load_rescaled(target, rescaled))
    assert "a.weight" in changed_names(module, target)
    assert_same_function(module, target, x)


def test_file_of_another_module_is_refused(tmp_path):
    module = conv_bn()
    path = str(tmp_path / "m.onnx")
    pt.export_module(module, torch.randn(1, 3, 6, 6), path)
    torch.manual_seed(0)
    wider = ConvBN(c=5)
    saved = state(wider)
    with pytest.raises(ModelError, match=r"'conv1.weight' has shape \[4, 3, 3, 3\] in .* but \[5, 3, 3, 3\]"):
        pt.load_rescaled(wider, path)
    assert_same_state(wider, saved)
    with pytest.raises(ModelError, match="no tensor"):
        pt.load_rescaled(nn.Sequential(nn.ReLU()), path)


# ------------------------------------------------------------------------------------ packaging
def test_the_core_package_never_imports_torch(run_command):
    code = ("import sys, onnx_pathcond, onnx_pathcond.api, onnx_pathcond.cli, onnx_pathcond.verify\n"
            "onnx_pathcond.rescale\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = run_command([sys.executable, "-c", code])
    assert done.returncode == 0, done.stderr


def test_submodule_is_reachable_from_the_package():
    assert onnx_pathcond.torch is pt
