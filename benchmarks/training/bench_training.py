"""Does rescaling a ReLU network help training? Epochs to 99 % and 100 % training accuracy.

    python benchmarks/training/bench_training.py                 # the full grid (see README.md here)
    python benchmarks/training/bench_training.py --quick         # every method and optimizer on 5 nets, 1 epoch, 1 seed
    python benchmarks/training/bench_training.py --nets mlp_k8 --optimizers sgd --lrs 0.1 --seeds 0 1 2 --out /tmp/r

Protocol (the paper's: rescale at initialisation, then train; and the authors' schedules):

* data that ships with scikit-learn: the 8×8 digits (1797 images, a fixed stratified 80/20
  split, each pixel standardised with the training set's mean and deviation) and two moons
  (1000 points, noise 0.1, the same split and standardisation);
* each net is initialised from the run's seed: He (normal, variance 2/fan-in, zero biases,
  BatchNorm γ = 1, β = 0), or with `--init torch` PyTorch's own defaults (the authors' code);
* the method rescales that net through the ONNX round trip (export, `onnx_pathcond.rescale`,
  weights loaded back by name; the rescaled net's outputs are checked equal to the original's);
  `none` trains the net as built, so the methods of one seed start from the same function;
  a scheduled method (`*_everyK_*`) rescales again after every K-th epoch, one sweep
  (`max_iter=1`), in place through `onnx_pathcond.torch.PathConditioner` (outputs checked at
  each step), the optimizer's state carried into the new coordinates (`_carry`) or lost to a
  new optimizer (`_recreate`, the authors' way); `_bnstat`: BatchNorm inputs rescaled too;
* SGD without momentum, SGD with momentum 0.9, or Adam (`--optimizers`), no weight decay,
  minibatches of 128 shuffled each epoch by the seed, cross-entropy; after every epoch the
  accuracy on the whole training set (eval mode);
* a run stops at 100 % training accuracy, at the epoch cap, or when it diverges: a non-finite
  minibatch loss, or an epoch's mean minibatch loss above 10 times the initial loss.

Outputs in --out: `training.md` (tables), `training_loss.png` (when matplotlib is installed)
and `runs.json` (every run, every epoch).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:  # the package of this checkout, when run as a script
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (after the path set-up)
from torch import nn  # noqa: E402

BATCH_SIZE = 128
DIVERGENCE_FACTOR = 10.0  # a training loss above this many times the initial loss is a divergence
TARGETS = (0.99, 1.0)  # training accuracies whose first epoch is reported
EXAMPLE_BATCH = 64  # inputs the round trip exports with and checks on (train-mode BatchNorm needs a batch)


# ---------------------------------------------------------------------------- data
@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int


def _split_and_standardise(name: str, x: np.ndarray, y: np.ndarray, sample_shape: Tuple[int, ...]) -> Dataset:
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0  # pixels that are blank in every training image stay zero

    def tensor(a):
        return torch.tensor(((a - mean) / std).reshape((-1,) + sample_shape), dtype=torch.float32)

    return Dataset(name, tensor(x_train), torch.tensor(y_train), tensor(x_test), torch.tensor(y_test),
                   classes=int(y.max()) + 1)


def load_data(name: str) -> Dataset:
    """`digits` (64 features), `digits_image` (the same as 1×8×8 images) or `moons`."""
    from sklearn import datasets

    if name in ("digits", "digits_image"):
        x, y = datasets.load_digits(return_X_y=True)
        return _split_and_standardise(name, x, y, (64,) if name == "digits" else (1, 8, 8))
    if name == "moons":
        x, y = datasets.make_moons(n_samples=1000, noise=0.1, random_state=0)
        return _split_and_standardise(name, x, y, (2,))
    raise ValueError(f"unknown data set '{name}'")


# ---------------------------------------------------------------------------- nets
def mlp(widths: Sequence[int]) -> nn.Module:
    """Linear layers of the given widths (input first, classes last) with a ReLU between."""
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def mlp_bn(widths: Sequence[int]) -> nn.Module:
    """The authors' MLP_BN: Linear, BatchNorm1d, ReLU for each hidden layer, then a Linear."""
    layers: List[nn.Module] = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-2], widths[-1]))


def cnn(batchnorm: bool) -> nn.Module:
    """On 1×8×8 digits: conv 16, conv 32, pool, conv 32, pool, linear 64, linear 10 (3×3
    convolutions, 2×2 max pools); with `batchnorm`, a BatchNorm after each convolution."""
    def conv(cin, cout):
        block = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm)]
        return block + ([nn.BatchNorm2d(cout)] if batchnorm else []) + [nn.ReLU()]

    return nn.Sequential(*conv(1, 16), *conv(16, 32), nn.MaxPool2d(2), *conv(32, 32), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 2 * 2, 64), nn.ReLU(), nn.Linear(64, 10))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (identity, or a strided 1×1 conv + BN), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet() -> nn.Module:
    """On 1×8×8 digits: stem conv 16 + BN, a block at 16 channels, a block down to 32 at 4×4,
    a block at 32, global average pool, linear 10."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 32, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


BATCHNORM = nn.modules.batchnorm._BatchNorm


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, BATCHNORM) for m in net.modules())


@dataclass(frozen=True)
class NetSpec:
    description: str
    data: str
    build: Callable[[], nn.Module]


NETS: Dict[str, NetSpec] = {
    "mlp_k3": NetSpec("MLP 64-500×3-10, digits", "digits", lambda: mlp([64] + [500] * 3 + [10])),
    "mlp_k5": NetSpec("MLP 64-500×5-10, digits", "digits", lambda: mlp([64] + [500] * 5 + [10])),
    "mlp_k8": NetSpec("MLP 64-500×8-10, digits", "digits", lambda: mlp([64] + [500] * 8 + [10])),
    "mlp_bn_k3": NetSpec("MLP 64-500×3-10 with BatchNorm1d after each hidden Linear (the authors' MLP_BN), digits",
                         "digits", lambda: mlp_bn([64] + [500] * 3 + [10])),
    "mlp_unbalanced": NetSpec("MLP 64-1024-32-1024-10, digits", "digits", lambda: mlp([64, 1024, 32, 1024, 10])),
    "moons_mlp": NetSpec("MLP 2-32-64-128-64-32-2, two moons", "moons", lambda: mlp([2, 32, 64, 128, 64, 32, 2])),
    "cnn": NetSpec("CNN conv16-conv32-pool-conv32-pool-fc64-fc10, digits 8×8", "digits_image", lambda: cnn(False)),
    "cnn_bn": NetSpec("the same CNN with BatchNorm after each conv", "digits_image", lambda: cnn(True)),
    "resnet": NetSpec("residual net, 3 BasicBlocks (16, 32↓, 32) with BatchNorm, digits 8×8", "digits_image",
                      resnet),
}


INITS = ("he", "torch")
INIT_LABELS = {"he": "He initialisation (normal, zero biases)",
               "torch": "PyTorch's default initialisation (as the modules are built)"}


def build_net(name: str, seed: int, init: str = "he") -> nn.Module:
    """Net `name` initialised from `seed`: `he` (normal, fan-in, ReLU gain, zero biases), or
    `torch` (PyTorch's own defaults, as the modules are built)."""
    torch.manual_seed(seed)
    net = NETS[name].build()
    if init == "torch":
        return net
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, BATCHNORM):
                m.reset_parameters()
    return net


# ---------------------------------------------------------------------------- rescaling
@dataclass(frozen=True)
class Method:
    """A rescaling method: `criterion` (None: no rescaling) and `solver` applied once at
    initialisation with the criterion's default sweeps; with `every` = k, again after every
    k-th epoch, one sweep (`max_iter=1`) through `onnx_pathcond.torch.PathConditioner`, the
    optimizer's state either carried into the new coordinates (`state="carry"`) or lost by
    making a new optimizer (`state="recreate"`, the authors' way). `bn_statistics`: the
    BatchNorm inputs are rescaled too (only on nets with BatchNorm)."""

    label: str
    criterion: Optional[str] = None
    solver: str = "cd"
    every: int = 0
    state: Optional[str] = None
    bn_statistics: bool = False

    @property
    def init_options(self) -> Optional[dict]:
        if self.criterion is None:
            return None
        return dict(criterion=self.criterion, solver=self.solver,
                    **(dict(bn_statistics=True) if self.bn_statistics else {}))


def _methods() -> Dict[str, Method]:
    methods = {"none": Method("none"),
               "pathcond": Method("PathCond", "pathcond"),
               "pathcond_exact": Method("PathCond exact", "pathcond", "exact"),
               "enorm": Method("ENorm", "enorm")}
    for criterion, label, every in (("pathcond", "PathCond", 5), ("pathcond", "PathCond", 20), ("enorm", "ENorm", 1)):
        for state in ("carry", "recreate"):
            methods[f"{criterion}_every{every}_{state}"] = Method(f"{label} /{every} {state}", criterion, every=every,
                                                                  state=state)
    for name in [n for n, m in methods.items() if m.criterion == "pathcond" and m.solver == "cd"]:
        m = methods[name]
        methods[name + "_bnstat"] = Method(m.label + " +BN stat.", m.criterion, m.solver, m.every, m.state, True)
    return methods


# name -> method; `none` trains the net as built
METHODS: Dict[str, Method] = _methods()
METHOD_LABELS = {name: m.label for name, m in METHODS.items()}

# optimizer -> (how it is made, its default learning rates)
LRS = (0.05, 0.1, 0.2, 0.4)  # the SGD grid's learning rates
ADAM_LRS = (0.001, 0.003, 0.01)
OPTIMIZERS: Dict[str, Callable] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}
OPTIMIZER_LABELS = {"sgd": "SGD", "momentum": "SGD momentum 0.9", "adam": "Adam"}
CONDITIONER_BATCH = 32  # inputs each schedule step checks the outputs on (4 forwards a step)


def applies(method: str, net: nn.Module, optimizer: str) -> bool:
    """Whether `method` is run on this net with this optimizer: the BatchNorm-statistics
    variants only on nets with BatchNorm; with plain SGD (no state) carrying the state and
    re-creating the optimizer are the same, so only `carry` is run."""
    m = METHODS[method]
    if m.bn_statistics and not has_batchnorm(net):
        return False
    return not (m.state == "recreate" and optimizer == "sgd")


def rescale_module(module: nn.Module, example: torch.Tensor, **options):
    """The round trip, `onnx_pathcond.torch.rescale_module`: export to ONNX, rescale, load the
    rescaled tensors back by name, check the module's outputs on `example` in eval and train
    mode. Returns the tool's report."""
    from onnx_pathcond.torch import rescale_module as round_trip

    return round_trip(module, example, **options).report


@dataclass
class Rescaling:
    """What a method did to one net: figures from the report, and the check that the
    rescaled net computes what the original does."""

    seconds: float
    am_gm_before: Optional[float] = None
    am_gm_after: Optional[float] = None
    max_abs_u: Optional[float] = None
    start_difference: float = 0.0  # max |rescaled − original| / max |original|, outputs on the training set
    error: Optional[str] = None


def apply_method(net: nn.Module, method: str, data: Dataset) -> Rescaling:
    """Rescale `net` in place with `method`, and measure how far its outputs on the training
    set moved (in eval mode, and in training mode for nets with BatchNorm)."""
    options = METHODS[method].init_options
    if options is None:
        return Rescaling(seconds=0.0)
    original = _outputs(net, data.x_train)
    t0 = time.perf_counter()
    try:
        report = rescale_module(net, data.x_train[:EXAMPLE_BATCH], **options)
    except Exception as error:  # noqa: BLE001  (reported as a failed method, the grid goes on)
        return Rescaling(seconds=time.perf_counter() - t0, error=f"{type(error).__name__}: {error}")
    seconds = time.perf_counter() - t0
    rescaled = _outputs(net, data.x_train)
    difference = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(rescaled, original))
    criterion, solver = report.criterion, report.solver
    return Rescaling(seconds=seconds, am_gm_before=criterion.am_gm_before if criterion else None,
                     am_gm_after=criterion.am_gm_after if criterion else None,
                     max_abs_u=solver.max_abs_u if solver else None, start_difference=difference)


def _outputs(net: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The net's outputs on `x` in eval mode and, when it has BatchNorm, in training mode
    (batch statistics; the running statistics are restored afterwards)."""
    outputs = []
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for training in (False, True):
            if training and not has_batchnorm(net):
                continue
            net.train(training)
            outputs.append(net(x).double())
    net.load_state_dict(saved)
    net.train()
    return outputs


# ---------------------------------------------------------------------------- training
@dataclass
class Run:
    net: str
    method: str
    lr: float
    seed: int
    optimizer: str = "sgd"
    # training loss in train mode, what the optimizer minimises: epoch 0 the whole training set
    # before any step, then the mean of each epoch's minibatch losses
    loss: List[float] = field(default_factory=list)
    eval_loss: List[float] = field(default_factory=list)  # whole training set, eval mode, after each epoch
    accuracy: List[float] = field(default_factory=list)  # training accuracy, eval mode, the same epochs
    reached: Dict[str, Optional[int]] = field(default_factory=dict)  # "99", "100" -> first epoch
    diverged: Optional[int] = None  # epoch at which the run diverged
    test_accuracy: Optional[float] = None  # at the last epoch run
    seconds: float = 0.0
    rescaling: Optional[Rescaling] = None  # at initialisation
    # the schedule's steps, after the epochs they follow: epoch, F before and after the sweep,
    # optimizer state tensors carried; and the time they took (in `seconds` too)
    steps: List[dict] = field(default_factory=list)
    step_seconds: float = 0.0
    step_errors: int = 0
    step_error: Optional[str] = None  # the first


def _evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
    net.eval()
    with torch.no_grad():
        logits = net(x)
        loss = float(nn.functional.cross_entropy(logits, y))
        accuracy = float((logits.argmax(dim=1) == y).double().mean())
    net.train()
    return loss, accuracy


def _train_mode_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The loss in train mode (BatchNorm on batch statistics), on a copy of the net so that its
    running statistics do not move."""
    with torch.no_grad():
        return float(nn.functional.cross_entropy(copy.deepcopy(net).train()(x), y))


class _Schedule:
    """The schedule of a method with `every`: after every k-th epoch, one sweep in place
    through a PathConditioner (made at the first step, so analysed once per run), the state
    carried or the optimizer made again."""

    def __init__(self, method: Method, net: nn.Module, example: torch.Tensor, run: Run):
        self.method, self.net, self.example, self.run = method, net, example, run
        self.conditioner = None

    def due(self, epoch: int) -> bool:
        return bool(self.method.every) and epoch % self.method.every == 0

    def step(self, epoch: int, optimiser: torch.optim.Optimizer) -> torch.optim.Optimizer:
        from onnx_pathcond.torch import PathConditioner

        m, run = self.method, self.run
        t0 = time.perf_counter()
        try:
            if self.conditioner is None:
                self.conditioner = PathConditioner(self.net, self.example, optimiser if m.state == "carry" else None,
                                                   check=True, bn_statistics=m.bn_statistics,
                                                   criterion=m.criterion, solver=m.solver)
            done = self.conditioner.rescale(max_iter=1)
            solver = done.report.solver
            run.steps.append(dict(epoch=epoch, F_before=solver.F_before if solver else None,
                                  F_after=solver.F_after if solver else None, state_changed=done.state_changed))
            if m.state == "recreate":
                optimiser = OPTIMIZERS[run.optimizer](self.net.parameters(), run.lr)
        except Exception as error:  # noqa: BLE001  (counted; the conditioner put the weights back)
            run.step_errors += 1
            run.step_error = run.step_error or f"epoch {epoch}: {type(error).__name__}: {error}"
        run.step_seconds += time.perf_counter() - t0
        return optimiser


def train(net: nn.Module, data: Dataset, run: Run, epochs: int, batch_size: int = BATCH_SIZE) -> Run:
    """`run.optimizer` on `net` until 100 % training accuracy, `epochs` epochs, or a divergence;
    with a scheduled method, its rescaling after every k-th epoch that training goes on from.

    Divergence is read on the train-mode loss (a minibatch loss that is not finite, or an
    epoch's mean above DIVERGENCE_FACTOR times the initial loss), not on the eval-mode one: in
    the first epochs a BatchNorm's running statistics lag behind its weights, and the eval-mode
    loss of a net that trains well can spike a hundredfold for an epoch."""
    t0 = time.perf_counter()
    optimiser = OPTIMIZERS[run.optimizer](net.parameters(), run.lr)
    schedule = _Schedule(METHODS[run.method], net, data.x_train[:CONDITIONER_BATCH], run)
    order = torch.Generator().manual_seed(run.seed)
    run.loss = [_train_mode_loss(net, data.x_train, data.y_train)]
    eval_loss, accuracy = _evaluate(net, data.x_train, data.y_train)
    run.eval_loss, run.accuracy = [eval_loss], [accuracy]
    run.reached = {_target_key(t): None for t in TARGETS}
    limit = DIVERGENCE_FACTOR * run.loss[0]
    net.train()
    for epoch in range(1, epochs + 1):
        total, seen = 0.0, 0
        for batch in torch.randperm(len(data.y_train), generator=order).split(batch_size):
            optimiser.zero_grad()
            batch_loss = nn.functional.cross_entropy(net(data.x_train[batch]), data.y_train[batch])
            if not torch.isfinite(batch_loss):
                total, seen = math.inf, 1
                break
            batch_loss.backward()
            optimiser.step()
            total += batch_loss.item() * len(batch)
            seen += len(batch)
        loss = total / seen
        eval_loss, accuracy = _evaluate(net, data.x_train, data.y_train) if math.isfinite(loss) else (math.inf, 0.0)
        run.loss.append(loss)
        run.eval_loss.append(eval_loss)
        run.accuracy.append(accuracy)
        if not math.isfinite(loss) or loss > limit:
            run.diverged = epoch
            break
        for target in TARGETS:
            if accuracy >= target and run.reached[_target_key(target)] is None:
                run.reached[_target_key(target)] = epoch
        if accuracy >= TARGETS[-1]:
            break
        if epoch < epochs and schedule.due(epoch):
            optimiser = schedule.step(epoch, optimiser)
    if run.diverged is None:
        run.test_accuracy = _evaluate(net, data.x_test, data.y_test)[1]
    run.seconds = time.perf_counter() - t0
    return run


def _target_key(target: float) -> str:
    return f"{100 * target:g}"


# ---------------------------------------------------------------------------- the grid
def run_grid(nets: Sequence[str], methods: Sequence[str], lrs: Dict[str, Sequence[float]], seeds: Sequence[int],
             epochs: int, batch_size: int = BATCH_SIZE, init: str = "he",
             log: Callable[[str], None] = print) -> List[Run]:
    """Every net × optimizer (the keys of `lrs`) × its learning rates × method × seed, the
    methods that apply (`applies`). A net is rescaled at initialisation once per seed and
    initial rescaling (the methods that share one, e.g. `pathcond` and `pathcond_every5_*`,
    start from the same rescaled net); each run trains a fresh copy of it."""
    runs: List[Run] = []
    datasets: Dict[str, Dataset] = {}
    for net_name in nets:
        spec = NETS[net_name]
        if spec.data not in datasets:
            datasets[spec.data] = load_data(spec.data)
        data = datasets[spec.data]
        for seed in seeds:
            starts: Dict[Tuple, Tuple[Rescaling, dict]] = {}
            for optimizer, rates in lrs.items():
                for method in methods:
                    net = build_net(net_name, seed, init)
                    if not applies(method, net, optimizer):
                        continue
                    options = METHODS[method].init_options
                    key = tuple(sorted((options or {}).items()))
                    if key not in starts:
                        rescaling = apply_method(net, method, data)
                        if rescaling.error:
                            log(f"{net_name} {method} seed {seed}: rescaling failed: {rescaling.error}")
                        starts[key] = rescaling, {k: v.clone() for k, v in net.state_dict().items()}
                    rescaling, start = starts[key]
                    for lr in rates:
                        run = Run(net_name, method, lr, seed, optimizer, rescaling=rescaling)
                        if not rescaling.error:
                            net.load_state_dict(start)
                            train(net, data, run, epochs, batch_size or len(data.y_train))
                            log(f"{net_name:15s} {optimizer:8s} lr {lr:<6g} {method:27s} seed {seed}: 99% at "
                                f"{run.reached['99']}, 100% at {run.reached['100']}, diverged {run.diverged}, "
                                f"test {run.test_accuracy}, {len(run.steps)} steps"
                                f"{f' ({run.step_errors} failed)' if run.step_errors else ''}, {run.seconds:.1f}s")
                        runs.append(run)
    return runs


# ---------------------------------------------------------------------------- outputs
def _median_epoch(values: List[Optional[int]]) -> Optional[float]:
    """Median of the epochs at which seeds reached a target, a seed that never did counting
    as later than all; None when the median seed did not reach it."""
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    middle = ordered[(len(ordered) - 1) // 2: len(ordered) // 2 + 1]
    if any(v is None for v in middle):
        return None
    return statistics.mean(middle)


def _format_epochs(values: List[Optional[int]], cap: int, diverged: List[Optional[int]]) -> str:
    median = _median_epoch(values)
    per_seed = ", ".join(str(v) if v is not None else (f"div {d}" if d else f">{cap}")
                         for v, d in zip(values, diverged))
    return f"{'—' if median is None else f'{median:g}'} ({per_seed})"


def _group(runs: List[Run]) -> Dict[Tuple[str, str, float, str], List[Run]]:
    groups: Dict[Tuple[str, str, float, str], List[Run]] = {}
    for run in runs:
        groups.setdefault((run.net, run.optimizer, run.lr, run.method), []).append(run)
    return groups


def _speed_key(group: List[Run]) -> Tuple[float, float]:
    """Median epochs to 100 %, then to 99 %, a target the median seed missed counting as ∞."""
    m100 = _median_epoch([r.reached.get("100") for r in group])
    m99 = _median_epoch([r.reached.get("99") for r in group])
    return (math.inf if m100 is None else m100, math.inf if m99 is None else m99)


def compare(group: List[Run], baseline: List[Run]) -> int:
    """-1 when `group` is faster than `baseline` (median epochs to 100 %, then to 99 %), 1 when
    slower, 0 when the same."""
    a, b = _speed_key(group), _speed_key(baseline)
    return (a > b) - (a < b)


def best_lr(runs: List[Run]) -> Optional[float]:
    """Not a run: the learning rate (of those runs, one method, one net, one optimizer) with the
    lowest median epochs to 100 %, then to 99 %; None when no rate reached either."""
    by_lr: Dict[float, List[Run]] = {}
    for run in runs:
        by_lr.setdefault(run.lr, []).append(run)
    lr = min(by_lr, key=lambda lr: _speed_key(by_lr[lr]))
    return None if _speed_key(by_lr[lr]) == (math.inf, math.inf) else lr


def _short(group: List[Run]) -> str:
    m99 = _median_epoch([r.reached["99"] for r in group])
    m100 = _median_epoch([r.reached["100"] for r in group])
    return f"{'—' if m99 is None else f'{m99:g}'} / {'—' if m100 is None else f'{m100:g}'}"


def _failed(group: List[Run]) -> Optional[str]:
    rescaling = group[0].rescaling
    return rescaling.error if rescaling and rescaling.error else None


def markdown(runs: List[Run], epochs: int, batch_size: int, init: str, command: str) -> str:
    groups = _group(runs)
    nets = list(dict.fromkeys(r.net for r in runs))
    optimizers = list(dict.fromkeys(r.optimizer for r in runs))
    methods = [m for m in METHODS if any(r.method == m for r in runs)]  # in METHODS' order
    seeds = sorted({r.seed for r in runs})
    pairs = [(n, o) for n in nets for o in optimizers if any(r.net == n and r.optimizer == o for r in runs)]

    def present(net, optimizer):
        return [m for m in methods if any(k[0] == net and k[1] == optimizer and k[3] == m for k in groups)]

    lines = [
        "# Training with and without rescaling",
        "",
        f"Written by `{command}`. Protocol in `benchmarks/training/README.md`: {INIT_LABELS[init]}; each "
        "method rescales once before training (its criterion's default sweeps), a scheduled one (`/k`) "
        "again after every k-th epoch, one sweep, with the optimizer's state carried into the new "
        "coordinates (`carry`) or a new optimizer made (`recreate`; with plain SGD the two are the same and "
        "only `carry` is run); "
        f"optimizers {', '.join(OPTIMIZER_LABELS[o] for o in optimizers)} "
        f"({f'minibatch {batch_size}' if batch_size else 'full batch'}, no weight decay), epoch cap {epochs}, "
        f"seeds {', '.join(map(str, seeds))}. Epochs to 99 % and to 100 % training accuracy: median over "
        "seeds (a seed that never got there counts as the slowest; `—`: the median seed never got there), "
        "then each seed's (`div N`: diverged at epoch N; `>cap`: not reached by the cap). Test accuracy: "
        "median over the seeds that did not diverge, at their last epoch.",
        "",
        "## Is it safe? Each method against no rescaling, over the learning rates",
        "",
        "For each net and optimizer: at how many of the learning rates tried the method is faster / "
        "slower than `none` at the same rate (median epochs to 100 %, then to 99 %; a target the median "
        "seed missed counts as never), and at how many it diverged on more seeds than `none` did "
        "(`faster/slower/diverged more` of the rates).",
        "",
    ]
    others = [m for m in methods if m != "none"]
    lines += ["| net | optimizer | " + " | ".join(METHOD_LABELS[m] for m in others) + " |",
              "| --- | --- |" + " --- |" * len(others)]
    for net, optimizer in pairs:
        cells = []
        for method in others:
            rates = sorted({k[2] for k in groups if k[0] == net and k[1] == optimizer and k[3] == method
                            and (net, optimizer, k[2], "none") in groups and not _failed(groups[k])})
            if not rates:
                cells.append("·")
                continue
            faster = slower = more = 0
            for lr in rates:
                group, base = groups[(net, optimizer, lr, method)], groups[(net, optimizer, lr, "none")]
                c = compare(group, base)
                faster, slower = faster + (c < 0), slower + (c > 0)
                more += sum(r.diverged is not None for r in group) > sum(r.diverged is not None for r in base)
            cells.append(f"{faster}/{slower}/{more} of {len(rates)}")
        lines.append(f"| {net} | {OPTIMIZER_LABELS[optimizer]} | " + " | ".join(cells) + " |")
    lines += ["", "`·`: not run (a BatchNorm-statistics variant on a net without BatchNorm, `recreate` with plain "
              "SGD).", "",
              "## At each learning rate",
              "",
              "Median epochs to 99 % / to 100 %; `div d`: d seeds diverged; `↓` faster than `none` at that rate, "
              "`↑` slower (as above).", ""]
    for net, optimizer in pairs:
        here = present(net, optimizer)
        lines += [f"### {net}, {OPTIMIZER_LABELS[optimizer]}", "",
                  "| lr | " + " | ".join(METHOD_LABELS[m] for m in here) + " |", "| --- |" + " --- |" * len(here)]
        for lr in sorted({k[2] for k in groups if k[0] == net and k[1] == optimizer}):
            cells = []
            base = groups.get((net, optimizer, lr, "none"))
            for method in here:
                group = groups.get((net, optimizer, lr, method))
                if not group:
                    cells.append("·")
                    continue
                if _failed(group):
                    cells.append("rescaling failed")
                    continue
                diverged = sum(r.diverged is not None for r in group)
                mark = ""
                if base and method != "none" and not _failed(base):
                    mark = {-1: " ↓", 0: "", 1: " ↑"}[compare(group, base)]
                cells.append(_short(group) + mark + (f" · div {diverged}" if diverged else ""))
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## At each method's best learning rate",
        "",
        "Best: the lowest median epochs to 100 % (then to 99 %) over the learning rates tried. Cells: median "
        "epochs to 99 % / to 100 %.",
        "",
        "| net | optimizer | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |",
        "| --- | --- |" + " --- |" * len(methods),
    ]
    for net, optimizer in pairs:
        cells = []
        for method in methods:
            chosen = [r for r in runs if r.net == net and r.optimizer == optimizer and r.method == method]
            lr = best_lr(chosen) if chosen and not _failed(chosen) else None
            if not chosen:
                cells.append("·")
            elif lr is None:
                cells.append("never reached")
            else:
                cells.append(f"{_short(groups[(net, optimizer, lr, method)])} at lr {lr:g}")
        lines.append(f"| {net} | {OPTIMIZER_LABELS[optimizer]} | " + " | ".join(cells) + " |")
    lines.append("")
    for net in nets:
        lines += [f"## {net}: {NETS[net].description}", "",
                  "| optimizer | lr | method | epochs to 99 % | epochs to 100 % | test acc. | diverged | AM/GM of diag(G) "
                  "| max abs(u) | schedule steps |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for optimizer in optimizers:
            for lr in sorted({k[2] for k in groups if k[0] == net and k[1] == optimizer}):
                for method in methods:
                    group = groups.get((net, optimizer, lr, method))
                    if not group:
                        continue
                    head = f"| {OPTIMIZER_LABELS[optimizer]} | {lr:g} | {METHOD_LABELS[method]}"
                    if _failed(group):
                        lines.append(f"{head} | rescaling failed: {_failed(group)} | | | | | | |")
                        continue
                    diverged = [r.diverged for r in group]
                    tests = [r.test_accuracy for r in group if r.test_accuracy is not None]
                    am_gm = sorted({(r.rescaling.am_gm_before, r.rescaling.am_gm_after) for r in group
                                    if r.rescaling and r.rescaling.am_gm_before is not None})
                    am_gm_text = "; ".join(f"{a:.3g} → {b:.3g}" for a, b in am_gm[:1]) + (" …" if len(am_gm) > 1 else "")
                    us = [r.rescaling.max_abs_u for r in group if r.rescaling and r.rescaling.max_abs_u is not None]
                    steps = "—"
                    if METHODS[method].every:
                        steps = f"{statistics.median(len(r.steps) for r in group):g}"
                        failed = sum(r.step_errors for r in group)
                        steps += f" ({failed} failed: {next(r.step_error for r in group if r.step_error)})" if failed else ""
                    lines.append(
                        f"{head} | {_format_epochs([r.reached['99'] for r in group], epochs, diverged)}"
                        f" | {_format_epochs([r.reached['100'] for r in group], epochs, diverged)}"
                        f" | {f'{100 * statistics.median(tests):.1f} %' if tests else '—'}"
                        f" | {sum(d is not None for d in diverged)}/{len(group)}"
                        f" | {am_gm_text or '—'} | {f'{max(us):.3g}' if us else '—'} | {steps} |")
        lines.append("")
    lines += ["`AM/GM of diag(G)`: before → after the rescaling at initialisation (seed " + str(seeds[0]) +
              "; PathCond drives it towards 1). `max abs(u)`: the largest log-rescaling of any neuron at "
              "initialisation over the seeds (λ = exp(u/2)). `schedule steps`: the median number of scheduled "
              "sweeps a run made (none after the epoch it stopped at), and those that failed (the weights put back).",
              ""]
    return "\n".join(lines)


def plot(runs: List[Run], path: Path) -> bool:
    """Training loss per epoch, one panel per net, optimizer and learning rate, one colour per
    method, one line per seed; a cross where a run diverged. False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys((r.net, r.optimizer) for r in runs))
    lrs = {row: sorted({r.lr for r in runs if (r.net, r.optimizer) == row}) for row in rows}
    columns = max(len(v) for v in lrs.values())
    methods = list(dict.fromkeys(r.method for r in runs))
    palette = plt.get_cmap("tab20").colors if len(methods) > 10 else plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    # a diverging run's loss goes up to this ceiling, where a cross marks it
    ceiling = 2 * DIVERGENCE_FACTOR * max(r.loss[0] for r in runs if r.loss)
    first_seed = min(r.seed for r in runs)
    fig, axes = plt.subplots(len(rows), columns, figsize=(3.2 * columns, 2.4 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(columns):
            ax = axes[i][j]
            if j >= len(lrs[row]):
                ax.axis("off")
                continue
            lr = lrs[row][j]
            for run in runs:
                if (run.net, run.optimizer) != row or run.lr != lr or not run.loss:
                    continue
                finite = [min(v, ceiling) if math.isfinite(v) else ceiling for v in run.loss]
                label = METHOD_LABELS[run.method] if run.seed == first_seed else None
                ax.plot(range(len(finite)), finite, color=colours[run.method], lw=1, alpha=0.8, label=label)
                if run.diverged:
                    ax.plot([len(finite) - 1], [finite[-1]], "x", color=colours[run.method])
            ax.set_yscale("log")
            ax.set_title(f"{row[0]}, {OPTIMIZER_LABELS[row[1]]}, lr {lr:g}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(rows) - 1:
                ax.set_xlabel("epoch", fontsize=7)
            if j == 0:
                ax.set_ylabel("training loss (epoch mean)", fontsize=7)
    legend: Dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.4 * len(rows)) * (1 + len(labels) // 6)))
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return True


def write_outputs(runs: List[Run], out: Path, settings: dict) -> List[Path]:
    """training.md, runs.json (`settings`: epochs, batch_size, init, command, and the runs) and
    the plot, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "training.md", out / "runs.json"]
    written[0].write_text(markdown(runs, settings["epochs"], settings["batch_size"], settings["init"],
                                   settings["command"]))
    written[1].write_text(json.dumps({"settings": settings, "runs": [asdict(r) for r in runs]}))
    if plot(runs, out / "training_loss.png"):
        written.append(out / "training_loss.png")
    return written


def read_runs(path: Path) -> Tuple[List[Run], dict]:
    """The runs and settings that `write_outputs` saved in a runs.json."""
    saved = json.loads(Path(path).read_text())  # an infinite loss is saved as Infinity, which json reads back
    runs = []
    for record in saved["runs"]:
        rescaling = Rescaling(**record["rescaling"]) if record["rescaling"] else None
        runs.append(Run(**dict(record, rescaling=rescaling)))
    return runs, saved["settings"]


# ---------------------------------------------------------------------------- command line
# one net of each kind (dense, dense with BatchNorm, two moons, convolutions with
# BatchNorm, residual), every optimizer at one learning rate
QUICK = dict(nets=["mlp_k3", "mlp_bn_k3", "moons_mlp", "cnn_bn", "resnet"], seeds=[0], epochs=1,
             lrs=[0.05], adam_lrs=[0.001])


def learning_rates(optimizers: Sequence[str], lrs: Sequence[float], adam_lrs: Sequence[float]) -> Dict[str, List[float]]:
    """optimizer -> its learning rates: `lrs` for SGD with and without momentum, `adam_lrs` for Adam."""
    return {o: list(adam_lrs if o == "adam" else lrs) for o in optimizers}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS), metavar="NET",
                        help=f"of {', '.join(NETS)} (default: all)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD",
                        help=f"of {', '.join(METHODS)} (default: all; one that does not apply to a net or "
                             "optimizer is skipped there)")
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS),
                        help="sgd (no momentum), momentum (SGD, momentum 0.9), adam; default: all three")
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LRS),
                        help=f"SGD's learning rates, with and without momentum (default {' '.join(map(str, LRS))})")
    parser.add_argument("--adam-lrs", nargs="+", type=float, default=list(ADAM_LRS),
                        help=f"Adam's learning rates (default {' '.join(map(str, ADAM_LRS))})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=200, help="epoch cap (default 200)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: every method and optimizer on {', '.join(QUICK['nets'])}, "
                             f"{QUICK['epochs']} epoch, seed 0, lr {QUICK['lrs'][0]} (Adam {QUICK['adam_lrs'][0]})")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder (default results/ here)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help=f"minibatch (default {BATCH_SIZE}; 0: the whole training set)")
    parser.add_argument("--init", choices=INITS, default="he",
                        help="he (default): He normal, zero biases; torch: PyTorch's default initialisation")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--from-json", type=Path, metavar="RUNS_JSON",
                        help="train nothing: write the table and the plot again from a runs.json (into --out if "
                             "given, else next to it)")
    args = parser.parse_args(argv)
    if args.from_json:
        runs, settings = read_runs(args.from_json)
        out = args.out if "--out" in (sys.argv[1:] if argv is None else argv) else args.from_json.parent
        for path in write_outputs(runs, out, settings):
            print(f"wrote {path}")
        return 0
    if args.quick:
        args.nets, args.seeds, args.epochs = QUICK["nets"], QUICK["seeds"], QUICK["epochs"]
        args.lrs, args.adam_lrs = QUICK["lrs"], QUICK["adam_lrs"]
    torch.set_num_threads(args.threads)
    command = "python benchmarks/training/bench_training.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    runs = run_grid(args.nets, args.methods, learning_rates(args.optimizers, args.lrs, args.adam_lrs), args.seeds,
                    args.epochs, args.batch_size, args.init)
    seconds = time.perf_counter() - t0
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, init=args.init, command=command.strip(),
                    seconds=round(seconds))
    for path in write_outputs(runs, args.out, settings):
        print(f"wrote {path}")
    print(f"{len(runs)} runs in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
