"""Analyse once, rescale many times: the plan (onnx_pathcond.plan) and PathConditioner
(onnx_pathcond.torch), with the optimizer's state carried into the new coordinates.

The transport is checked against the gradient of the rescaled module itself: each moment is
set to the gradient (or its square) at the current point, the module is rescaled, and the
carried moment must equal the gradient (or its square) of the rescaled module on the same
batch. The outputs before and after are the test's own runs of a copy of the module."""

from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import pytest

from onnx_pathcond import InputError, PathCondError, VerificationError, rescale
from onnx_pathcond.plan import RescalingPlan

torch = pytest.importorskip("torch")
zoo = pytest.importorskip("models.zoo")
pt = pytest.importorskip("onnx_pathcond.torch")
nn, F = torch.nn, torch.nn.functional

from support.repo import ROOT  # noqa: E402  (the repository, whatever the working directory)


# ------------------------------------------------------------------------------ helpers
def _batch(shape, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + tuple(shape[1:]), generator=g)


def _loss(module, x):
    """A loss that reads every output: the sum of squares of the outputs."""
    y = module(x)
    return (y ** 2).mean()


def _gradients(module, x, train=True):
    module.train(train)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    _loss(module, x).backward()
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def _outputs(module, x, train):
    m = copy.deepcopy(module).train(train)
    torch.manual_seed(0)
    with torch.no_grad():
        return m(x)


def _assert_same_function(before, after, x, rtol=1e-5):
    for train in (False, True):
        a, b = _outputs(before, x, train), _outputs(after, x, train)
        assert (a - b).abs().max().item() <= rtol * a.abs().max().item(), "train" if train else "eval"


def _scale(grads):
    return max(g.abs().max().item() for g in grads.values())


MOMENTS = {  # optimizer -> (state entry, power of the gradient it holds)
    "sgd_momentum": (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), {"momentum_buffer": 1}),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True),
             {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-3), {"exp_avg": 1, "exp_avg_sq": 2}),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, centered=True),
                {"square_avg": 2, "momentum_buffer": 1, "grad_avg": 1}),
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=1e-2), {"sum": 2}),
}


# ------------------------------------------------------------------------------ the transport
@pytest.mark.parametrize("kind", sorted(MOMENTS))
@pytest.mark.parametrize("family", ["mlp_unbalanced", "resnet", "densenet"])
def test_carried_moments_are_the_gradients_of_the_rescaled_module(kind, family):
    module, shape = zoo.build(family)
    x = _batch(shape)
    make, entries = MOMENTS[kind]
    optimizer = make(module.parameters())
    cond = pt.PathConditioner(module, x[:1], optimizer)
    grads = _gradients(module, x)
    for name, p in module.named_parameters():
        state = optimizer.state[p]
        counts = "step" in pt.OPTIMIZER_STATE[type(optimizer)]
        if counts:
            state["step"] = torch.tensor(3.0)
        for entry, power in entries.items():
            state[entry] = grads[name] ** power
    step = cond.rescale()
    assert step.changed and step.state_changed >= len(step.changed)
    after = _gradients(module, x)
    scale = _scale(after)
    for name, p in module.named_parameters():
        for entry, power in entries.items():
            carried = optimizer.state[p][entry]
            expected = after[name] ** power
            # relative to the largest gradient (a bias before BatchNorm has a gradient of rounding size)
            assert (carried - expected).abs().max().item() <= 1e-4 * scale ** power, (name, entry)
        assert not counts or optimizer.state[p]["step"].item() == 3.0
    # plain SGD keeps no state: nothing to carry, the weights still move
    plain = torch.optim.SGD(module.parameters(), lr=0.1)
    assert pt.PathConditioner(module, x[:1], plain).rescale().state_changed == 0


def test_factors_are_new_over_old_and_zeros_stay_zero():
    module, shape = zoo.build("resnet")
    with torch.no_grad():
        module.conv1.weight[0, 0] = 0.0  # exact zeros inside a rescaled tensor
    x = _batch(shape)
    before = copy.deepcopy(module)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    _gradients(module, x)
    optimizer.step()  # momentum buffers from a real step
    buffers = {n: optimizer.state[p]["momentum_buffer"].clone() for n, p in module.named_parameters()}
    buffers["conv1.weight"][0, 0] = 0.0
    optimizer.state[module.conv1.weight]["momentum_buffer"][0, 0] = 0.0
    cond = pt.PathConditioner(module, x[:1], optimizer)
    before = copy.deepcopy(module)
    step = cond.rescale()
    old, new = dict(before.named_parameters()), dict(module.named_parameters())
    for name, factor in step.factors.items():
        if name not in new:
            continue  # a buffer: no optimizer state
        o, n_ = old[name].detach().double(), new[name].detach().double()
        moved = o != 0
        np.testing.assert_allclose((n_[moved] / o[moved]).numpy(), factor[moved].numpy(), rtol=1e-6)
        assert torch.all(n_[~moved] == 0)
        carried = optimizer.state[new[name]]["momentum_buffer"].double()
        np.testing.assert_allclose(carried.numpy(), (buffers[name].double() / factor).numpy(), rtol=1e-6, atol=1e-30)
    assert torch.all(optimizer.state[module.conv1.weight]["momentum_buffer"][0, 0] == 0)
    _assert_same_function(before, module, x)


# ------------------------------------------------------------------------------ refusals and failures
class _Custom(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["trace"] = p.detach().clone()


def _state_copy(optimizer):
    return {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in optimizer.state.items()}


def _assert_state_equal(optimizer, saved):
    assert {id(p) for p in optimizer.state} == set(saved)
    for p, s in optimizer.state.items():
        assert set(s) == set(saved[id(p)])
        for k, v in s.items():
            assert torch.equal(v, saved[id(p)][k]) if torch.is_tensor(v) else v == saved[id(p)][k]


@pytest.mark.parametrize("make", [lambda ps: torch.optim.LBFGS(ps), lambda ps: _Custom(ps)], ids=["lbfgs", "custom"])
def test_an_unknown_optimizer_is_refused_before_anything_changes(make):
    module, shape = zoo.build("mlp_unbalanced")
    x = _batch(shape)
    optimizer = make(module.parameters())
    with pytest.raises(PathCondError) as caught:
        pt.PathConditioner(module, x[:1], optimizer)
    message = str(caught.value)
    assert "\n" not in message and type(optimizer).__name__ in message and "reset_state" in message
    # asked to, it clears the state of the rescaled parameters instead
    if isinstance(optimizer, _Custom):
        optimizer.step()
    cond = pt.PathConditioner(module, x[:1], optimizer, reset_state=True)
    before = copy.deepcopy(module)
    step = cond.rescale()
    assert step.changed
    for name in step.changed:
        assert not optimizer.state.get(dict(module.named_parameters()).get(name), {})
    _assert_same_function(before, module, x)


def test_an_unknown_state_entry_is_refused_and_nothing_changes():
    module, shape = zoo.build("mlp_unbalanced")
    x = _batch(shape)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    _gradients(module, x)
    optimizer.step()
    first = next(module.parameters())
    optimizer.state[first]["my_trace"] = torch.ones_like(first)
    cond = pt.PathConditioner(module, x[:1], optimizer)
    saved_values = {k: v.clone() for k, v in module.state_dict().items()}
    saved_state = _state_copy(optimizer)
    with pytest.raises(InputError, match="my_trace"):
        cond.rescale()
    assert all(torch.equal(v, saved_values[k]) for k, v in module.state_dict().items())
    _assert_state_equal(optimizer, saved_state)


def test_a_failed_check_puts_module_and_optimizer_back():
    module, shape = zoo.build("resnet")
    x = _batch(shape)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    _gradients(module, x)
    optimizer.step()
    modes = [m.training for m in module.modules()]
    cond = pt.PathConditioner(module, x[:1], optimizer, check_rtol=0.0)  # float32 rounding fails it
    saved_values = {k: v.clone() for k, v in module.state_dict().items()}
    saved_state = _state_copy(optimizer)
    with pytest.raises(VerificationError):
        cond.rescale()
    assert all(torch.equal(v, saved_values[k]) for k, v in module.state_dict().items())
    _assert_state_equal(optimizer, saved_state)
    assert [m.training for m in module.modules()] == modes


def test_without_the_check_a_failure_after_the_write_puts_module_and_optimizer_back(monkeypatch):
    """check=False runs no reference forwards and copies only the tensors it writes: a failure
    once they are written (here, carrying the optimizer's state) still leaves everything as found."""
    module, shape = zoo.build("resnet")
    x = _batch(shape)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    _gradients(module, x)
    optimizer.step()
    module.train()
    cond = pt.PathConditioner(module, x[:1], optimizer, check=False)
    saved_values = {k: v.clone() for k, v in module.state_dict().items()}
    saved_state = _state_copy(optimizer)

    def fails(*args, **kwargs):
        raise RuntimeError("carrying failed")

    monkeypatch.setattr(pt, "carry_optimizer_state", fails)
    with pytest.raises(RuntimeError, match="carrying failed"):
        cond.rescale()
    assert all(torch.equal(v, saved_values[k]) for k, v in module.state_dict().items())
    _assert_state_equal(optimizer, saved_state)
    assert all(m.training for m in module.modules())
    monkeypatch.undo()
    step = cond.rescale()  # and then it works, in the module's own mode
    assert step.loaded and step.check is None and all(m.training for m in module.modules())
    assert not all(torch.equal(v, saved_values[k]) for k, v in module.state_dict().items())


def test_options_are_checked():
    module, shape = zoo.build("mlp_unbalanced")
    x = _batch(shape)
    with pytest.raises(InputError, match="output"):
        pt.PathConditioner(module, x[:1], output="x.onnx")
    cond = pt.PathConditioner(module, x[:1])
    with pytest.raises(InputError, match="bn_statistics"):
        cond.rescale(bn_statistics=True)
    with pytest.raises(InputError, match="criterion"):
        cond.rescale(criterion="nope")


# ------------------------------------------------------------------------------ the plan
@pytest.mark.parametrize("name", ["mlp_unbalanced.onnx", "resnet.dynamo_bn.onnx", "densenet.legacy_bn.onnx"])
@pytest.mark.parametrize("bn_statistics", [False, True])
def test_resolving_the_same_weights_gives_the_fresh_result(name, bn_statistics, tmp_path):
    path = os.path.join(ROOT, "models", name)
    plan = RescalingPlan(onnx.load(path), bn_statistics=bn_statistics)
    first = plan.solve()
    assert not plan.update({n: np.array(plan.value(n)) for n in plan.parameters})  # the same values
    again = plan.solve()
    np.testing.assert_allclose(again.u, first.u, rtol=0, atol=1e-12)
    # and a fresh run of the tool writes what the plan's new values are
    out, report = rescale(path, bn_statistics=bn_statistics)
    written = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    new = plan.new_values(first.u)
    assert new and set(new) <= set(written)
    for tensor, value in new.items():
        np.testing.assert_array_equal(value, written[tensor])
    assert report.solver.F_after == pytest.approx(first.result.objective_after, rel=1e-12)


def test_the_plan_solves_on_new_weights_as_a_fresh_analysis_does():
    path = os.path.join(ROOT, "models", "resnet.dynamo_bn.onnx")
    model = onnx.load(path)
    plan = RescalingPlan(model)
    rng = np.random.default_rng(0)
    values = {n: (np.array(plan.value(n)) * rng.uniform(0.5, 2.0, np.shape(plan.value(n)))).astype(np.float32)
              for n in plan.parameters}
    assert not plan.update(values)
    solved = plan.solve(solver="exact")
    fresh = copy.deepcopy(model)
    for t in fresh.graph.initializer:
        if t.name in values:
            t.CopyFrom(onnx.numpy_helper.from_array(values[t.name], t.name))
    again = RescalingPlan(fresh).solve(solver="exact")
    np.testing.assert_allclose(solved.u, again.u, rtol=0, atol=1e-9)


def test_an_update_that_changes_what_the_analysis_read_analyses_again():
    """A tensor read by two nodes ties its non-zero elements only: new non-zeros change the groups."""
    from support.nets import Net

    net = Net([1, 4], seed=3)
    shared = net.param([4, 4], "shared", value=np.diag([1.0, 2.0, 3.0, 4.0]))
    h = net.relu(net.node("MatMul", [net.x, shared]))
    h = net.relu(net.node("MatMul", [h, shared]))
    model = net.model(net.node("MatMul", [h, net.param([4, 2])]))
    plan = RescalingPlan(model)
    dense = np.arange(1.0, 17.0, dtype=np.float32).reshape(4, 4)
    assert plan.update({shared: dense})
    assert plan.reanalysed == 1
    fresh = copy.deepcopy(model)
    for t in fresh.graph.initializer:
        if t.name == shared:
            t.CopyFrom(onnx.numpy_helper.from_array(dense, shared))
    assert plan.groups.count == RescalingPlan(fresh).groups.count
    np.testing.assert_allclose(plan.solve().u, RescalingPlan(fresh).solve().u, atol=1e-12)
    with pytest.raises(InputError, match="not an initializer"):
        plan.update({"nope": dense})
    with pytest.raises(InputError, match="shape"):
        plan.update({shared: dense[:2]})


# ------------------------------------------------------------------------------ in training
def _digits(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    return x, y


@pytest.mark.parametrize("kind", ["sgd", "sgd_momentum", "adam"])
@pytest.mark.parametrize("bn", [False, True])
def test_repeated_rescaling_in_a_training_loop(kind, bn):
    torch.manual_seed(0)
    layers = [nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64)]
    layers += [nn.BatchNorm1d(64)] if bn else []
    layers += [nn.ReLU(), nn.Linear(64, 4)]
    module = nn.Sequential(*layers)
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.05), "sgd_momentum": lambda ps: torch.optim.SGD(
        ps, lr=0.05, momentum=0.9), "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3)}[kind]
    optimizer = make(module.parameters())
    x, y = _digits()
    # with bn_statistics a BatchNorm in train mode computes with ε/λ² (README): 1e-3 is its default
    # allowance, which a channel of small batch variance can pass after a few epochs
    cond = pt.PathConditioner(module, x[:4], optimizer, bn_statistics=bn, check_rtol=1e-2 if bn else None)
    losses, steps = [], []
    for epoch in range(6):
        module.train()
        for start in range(0, len(x), 32):
            optimizer.zero_grad()
            loss = F.cross_entropy(module(x[start:start + 32]), y[start:start + 32])
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
        if epoch % 2 == 0:
            before = copy.deepcopy(module)
            steps.append(cond.rescale(max_iter=1))
            _assert_same_function(before, module, x[:16], rtol=1e-2 if bn else 1e-5)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert len(steps) == 3 and all(s.changed for s in steps) and cond.steps == 3
    assert all(s.report.solver.F_after <= s.report.solver.F_before for s in steps)


def test_enorm_and_a_tied_weight():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.shared = nn.Linear(16, 16)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            h = F.relu(self.inp(x))
            h = F.relu(self.shared(h))
            return self.out(F.relu(self.shared(h)))

    torch.manual_seed(1)
    module = Tied()
    x = torch.randn(8, 8)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    _gradients(module, x)
    optimizer.step()
    for criterion in ("enorm", "pathcond"):
        cond = pt.PathConditioner(module, x[:1], optimizer, criterion=criterion)
        before = copy.deepcopy(module)
        grads = _gradients(module, x)
        for name, p in module.named_parameters():
            optimizer.state[p]["momentum_buffer"] = grads[name].clone()
        step = cond.rescale()
        assert step.changed and step.report.criterion.name == criterion
        _assert_same_function(before, module, x)
        after = _gradients(module, x)
        scale = _scale(after)
        for name, p in module.named_parameters():
            assert (optimizer.state[p]["momentum_buffer"] - after[name]).abs().max() <= 1e-4 * scale, name


def test_the_command_line_offers_every_registered_criterion():
    from onnx_pathcond import criteria, options

    assert options.CRITERIA == criteria.names()
