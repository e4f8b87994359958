"""Does rescaling a ReLU network before training help SGD? Epochs to 99 % and 100 % training accuracy.

    python benchmarks/training/bench_training.py                 # the full grid (see README.md here)
    python benchmarks/training/bench_training.py --quick         # every method on 5 nets, 1 epoch, 1 seed
    python benchmarks/training/bench_training.py --nets mlp_k8 --lrs 0.1 --seeds 0 1 2 --out /tmp/r

Protocol (the paper's: rescale once at initialisation, then train with plain SGD):

* data that ships with scikit-learn: the 8×8 digits (1797 images, a fixed stratified 80/20
  split, each pixel standardised with the training set's mean and deviation) and two moons
  (1000 points, noise 0.1, the same split and standardisation);
* each net is initialised from the run's seed: He (normal, variance 2/fan-in, zero biases,
  BatchNorm γ = 1, β = 0), or with `--init torch` PyTorch's own defaults (the authors' code);
* the method rescales that net through the ONNX round trip (export, `onnx_pathcond.rescale`,
  weights loaded back by name; the rescaled net's outputs are checked equal to the original's);
  `none` trains the net as built, so the methods of one seed start from the same function;
* SGD without momentum or weight decay, minibatches of 128 shuffled each epoch by the seed,
  cross-entropy; after every epoch the accuracy on the whole training set (eval mode);
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
TARGETS = (0.99, 1.0)
EXAMPLE_BATCH = 64  # inputs the round trip exports with and checks on (train-mode BatchNorm needs a batch)  # training accuracies whose first epoch is reported


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


@dataclass(frozen=True)
class NetSpec:
    description: str
    data: str
    build: Callable[[], nn.Module]


LRS = (0.05, 0.1, 0.2, 0.4)  # the full grid's learning rates
NETS: Dict[str, NetSpec] = {
    "mlp_k3": NetSpec("MLP 64-500×3-10, digits", "digits", lambda: mlp([64] + [500] * 3 + [10])),
    "mlp_k5": NetSpec("MLP 64-500×5-10, digits", "digits", lambda: mlp([64] + [500] * 5 + [10])),
    "mlp_k8": NetSpec("MLP 64-500×8-10, digits", "digits", lambda: mlp([64] + [500] * 8 + [10])),
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
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
    return net


# ---------------------------------------------------------------------------- rescaling
# name -> keyword arguments of the rescaling step; None trains the net as built
METHODS: Dict[str, Optional[dict]] = {
    "none": None,
    "pathcond": dict(criterion="pathcond", solver="cd"),
    "pathcond_exact": dict(criterion="pathcond", solver="exact"),
    "enorm": dict(criterion="enorm", solver="cd"),
}
METHOD_LABELS = {"none": "none", "pathcond": "PathCond", "pathcond_exact": "PathCond exact", "enorm": "ENorm"}


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
    options = METHODS[method]
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
            if training and not any(isinstance(m, nn.BatchNorm2d) for m in net.modules()):
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
    # training loss in train mode, what SGD minimises: epoch 0 the whole training set before any
    # step, then the mean of each epoch's minibatch losses
    loss: List[float] = field(default_factory=list)
    eval_loss: List[float] = field(default_factory=list)  # whole training set, eval mode, after each epoch
    accuracy: List[float] = field(default_factory=list)  # training accuracy, eval mode, the same epochs
    reached: Dict[str, Optional[int]] = field(default_factory=dict)  # "99", "100" -> first epoch
    diverged: Optional[int] = None  # epoch at which the run diverged
    test_accuracy: Optional[float] = None  # at the last epoch run
    seconds: float = 0.0
    rescaling: Optional[Rescaling] = None


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


def train(net: nn.Module, data: Dataset, run: Run, epochs: int, batch_size: int = BATCH_SIZE) -> Run:
    """Plain SGD on `net` until 100 % training accuracy, `epochs` epochs, or a divergence.

    Divergence is read on the train-mode loss (a minibatch loss that is not finite, or an
    epoch's mean above DIVERGENCE_FACTOR times the initial loss), not on the eval-mode one: in
    the first epochs a BatchNorm's running statistics lag behind its weights, and the eval-mode
    loss of a net that trains well can spike a hundredfold for an epoch."""
    t0 = time.perf_counter()
    optimiser = torch.optim.SGD(net.parameters(), lr=run.lr)
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
    if run.diverged is None:
        run.test_accuracy = _evaluate(net, data.x_test, data.y_test)[1]
    run.seconds = time.perf_counter() - t0
    return run


def _target_key(target: float) -> str:
    return f"{100 * target:g}"


# ---------------------------------------------------------------------------- the grid
def run_grid(nets: Sequence[str], methods: Sequence[str], lrs: Sequence[float], seeds: Sequence[int],
             epochs: int, batch_size: int = BATCH_SIZE, init: str = "he",
             log: Callable[[str], None] = print) -> List[Run]:
    """Every net × learning rate × method × seed. A net is built and rescaled once per
    (method, seed); each learning rate trains a fresh copy of it."""
    runs: List[Run] = []
    datasets: Dict[str, Dataset] = {}
    for net_name in nets:
        spec = NETS[net_name]
        if spec.data not in datasets:
            datasets[spec.data] = load_data(spec.data)
        data = datasets[spec.data]
        for seed in seeds:
            for method in methods:
                net = build_net(net_name, seed, init)
                rescaling = apply_method(net, method, data)
                start = {k: v.clone() for k, v in net.state_dict().items()}
                if rescaling.error:
                    log(f"{net_name} {method} seed {seed}: rescaling failed: {rescaling.error}")
                for lr in lrs:
                    run = Run(net_name, method, lr, seed, rescaling=rescaling)
                    if not rescaling.error:
                        net.load_state_dict(start)
                        train(net, data, run, epochs, batch_size or len(data.y_train))
                        log(f"{net_name:15s} lr {lr:<6g} {method:15s} seed {seed}: 99% at {run.reached['99']}, "
                            f"100% at {run.reached['100']}, diverged {run.diverged}, test {run.test_accuracy}, "
                            f"{run.seconds:.1f}s")
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


def _group(runs: List[Run]) -> Dict[Tuple[str, float, str], List[Run]]:
    groups: Dict[Tuple[str, float, str], List[Run]] = {}
    for run in runs:
        groups.setdefault((run.net, run.lr, run.method), []).append(run)
    return groups


def best_lr(runs: List[Run]) -> Optional[Run]:
    """Not a run: the learning rate (of those runs, one method, one net) with the lowest
    median epochs to 100 %, then to 99 %; None when no rate reached either."""
    by_lr: Dict[float, List[Run]] = {}
    for run in runs:
        by_lr.setdefault(run.lr, []).append(run)

    def key(lr):
        m100 = _median_epoch([r.reached.get("100") for r in by_lr[lr]])
        m99 = _median_epoch([r.reached.get("99") for r in by_lr[lr]])
        return (math.inf if m100 is None else m100, math.inf if m99 is None else m99)

    lr = min(by_lr, key=key)
    return None if key(lr) == (math.inf, math.inf) else lr


def markdown(runs: List[Run], epochs: int, batch_size: int, init: str, command: str) -> str:
    groups = _group(runs)
    nets = list(dict.fromkeys(r.net for r in runs))
    methods = list(dict.fromkeys(r.method for r in runs))
    seeds = sorted({r.seed for r in runs})
    lines = [
        "# Training with and without rescaling",
        "",
        f"Written by `{command}`. Protocol in `benchmarks/training/README.md`: {INIT_LABELS[init]}, the "
        f"method applied once before training, plain SGD ({f'minibatch {batch_size}' if batch_size else 'full batch'}), epoch cap {epochs}, "
        f"seeds {', '.join(map(str, seeds))}. Epochs to 99 % and to 100 % training accuracy: median over "
        "seeds (a seed that never got there counts as the slowest; `—`: the median seed never got there), "
        "then each seed's (`div N`: diverged at epoch N; `>cap`: not reached by the cap). Test accuracy: "
        "median over the seeds that did not diverge, at their last epoch.",
        "",
        "## At each method's best learning rate",
        "",
        "Best: the lowest median epochs to 100 % (then to 99 %) over the learning rates tried.",
        "",
        "| net | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |",
        "| --- |" + " --- |" * len(methods),
    ]
    for net in nets:
        cells = []
        for method in methods:
            chosen = [r for r in runs if r.net == net and r.method == method]
            lr = best_lr(chosen) if chosen else None
            if lr is None:
                cells.append("never reached")
                continue
            group = groups[(net, lr, method)]
            m99 = _median_epoch([r.reached["99"] for r in group])
            m100 = _median_epoch([r.reached["100"] for r in group])
            cells.append(f"{'—' if m99 is None else f'{m99:g}'} / {'—' if m100 is None else f'{m100:g}'} at lr {lr:g}")
        lines.append(f"| {net} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: median epochs to 99 % / to 100 %.", ""]
    for net in nets:
        lines += [f"## {net}: {NETS[net].description}", "",
                  "| lr | method | epochs to 99 % | epochs to 100 % | test acc. | diverged | AM/GM of diag(G) | max abs(u) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for lr in sorted({r.lr for r in runs if r.net == net}):
            for method in methods:
                group = groups.get((net, lr, method))
                if not group:
                    continue
                rescaling = group[0].rescaling
                if rescaling and rescaling.error:
                    lines.append(f"| {lr:g} | {METHOD_LABELS[method]} | rescaling failed: {rescaling.error} | | | | | |")
                    continue
                diverged = [r.diverged for r in group]
                tests = [r.test_accuracy for r in group if r.test_accuracy is not None]
                am_gm = sorted({(r.rescaling.am_gm_before, r.rescaling.am_gm_after) for r in group
                                if r.rescaling and r.rescaling.am_gm_before is not None})
                am_gm_text = "; ".join(f"{a:.3g} → {b:.3g}" for a, b in am_gm[:1]) + (" …" if len(am_gm) > 1 else "")
                us = [r.rescaling.max_abs_u for r in group if r.rescaling and r.rescaling.max_abs_u is not None]
                lines.append(
                    f"| {lr:g} | {METHOD_LABELS[method]} | {_format_epochs([r.reached['99'] for r in group], epochs, diverged)}"
                    f" | {_format_epochs([r.reached['100'] for r in group], epochs, diverged)}"
                    f" | {f'{100 * statistics.median(tests):.1f} %' if tests else '—'}"
                    f" | {sum(d is not None for d in diverged)}/{len(group)}"
                    f" | {am_gm_text or '—'} | {f'{max(us):.3g}' if us else '—'} |")
        lines.append("")
    lines += ["`AM/GM of diag(G)`: before → after the rescaling (seed " + str(seeds[0]) + "; PathCond drives it "
              "towards 1). `max abs(u)`: the largest log-rescaling of any neuron over the seeds (λ = exp(u/2)).", ""]
    return "\n".join(lines)


def plot(runs: List[Run], path: Path) -> bool:
    """Training loss per epoch, one panel per net and learning rate, one colour per method,
    one line per seed; a cross where a run diverged. False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(dict.fromkeys(r.net for r in runs))
    lrs = sorted({r.lr for r in runs})
    methods = list(dict.fromkeys(r.method for r in runs))
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    # a diverging run's loss goes up to this ceiling, where a cross marks it
    ceiling = 2 * DIVERGENCE_FACTOR * max(r.loss[0] for r in runs if r.loss)
    fig, axes = plt.subplots(len(nets), len(lrs), figsize=(3.2 * len(lrs), 2.4 * len(nets)), squeeze=False)
    for i, net in enumerate(nets):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            for run in runs:
                if run.net != net or run.lr != lr or not run.loss:
                    continue
                finite = [min(v, ceiling) if math.isfinite(v) else ceiling for v in run.loss]
                label = METHOD_LABELS[run.method] if run.seed == min(r.seed for r in runs) else None
                ax.plot(range(len(finite)), finite, color=colours[run.method], lw=1, alpha=0.8, label=label)
                if run.diverged:
                    ax.plot([len(finite) - 1], [finite[-1]], "x", color=colours[run.method])
            ax.set_yscale("log")
            ax.set_title(f"{net}, lr {lr:g}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(nets) - 1:
                ax.set_xlabel("epoch", fontsize=7)
            if j == 0:
                ax.set_ylabel("training loss (epoch mean)", fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
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
# one net of each kind (dense, unbalanced, two moons, convolutions with BatchNorm, residual)
QUICK = dict(nets=["mlp_k3", "mlp_unbalanced", "moons_mlp", "cnn_bn", "resnet"], seeds=[0], epochs=1, lrs=[0.05])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LRS),
                        help=f"learning rates (default {' '.join(map(str, LRS))})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=200, help="epoch cap (default 200)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: every method on {', '.join(QUICK['nets'])}, {QUICK['epochs']} epoch, "
                             f"seed 0, lr {QUICK['lrs'][0]}")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder (default results/ here)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help=f"SGD minibatch (default {BATCH_SIZE}; 0: the whole training set)")
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
        args.nets, args.seeds, args.epochs, args.lrs = QUICK["nets"], QUICK["seeds"], QUICK["epochs"], QUICK["lrs"]
    torch.set_num_threads(args.threads)
    command = "python benchmarks/training/bench_training.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    runs = run_grid(args.nets, args.methods, args.lrs, args.seeds, args.epochs, args.batch_size, args.init)
    seconds = time.perf_counter() - t0
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, init=args.init, command=command.strip(),
                    seconds=round(seconds))
    for path in write_outputs(runs, args.out, settings):
        print(f"wrote {path}")
    print(f"{len(runs)} runs in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
