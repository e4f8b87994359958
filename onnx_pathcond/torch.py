"""The PyTorch round trip in one call: rescale a `torch.nn.Module`'s weights in place.

    import onnx_pathcond.torch
    result = onnx_pathcond.torch.rescale_module(model, example_batch)   # model's weights now rescaled
    print(result.summary())

`rescale_module` exports the module to ONNX with settings that keep every parameter's name and
BatchNorm in its inference form, runs the tool (`onnx_pathcond.rescale`) on that file, copies
every rewritten tensor back into the parameter or buffer of that name (in place: the same
`Parameter` objects, so an optimizer already built over them keeps working), and checks in
PyTorch that the module computes what it computed before, in eval and in train mode. Any
failure leaves the module as it was found and raises a `PathCondError` with a one-line message.

`load_rescaled(module, "out.onnx")` is the manual path, for a file the command line rescaled:
it loads by name with the same checks on names, shapes and dtypes.

This is the only part of the package that imports torch; `import onnx_pathcond` never does.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

try:
    import torch
except ImportError as exc:  # the core package works without torch; this submodule cannot
    raise ImportError("onnx_pathcond.torch needs PyTorch: pip install 'onnx-pathcond[torch]' "
                      "(or any torch build)") from exc

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from . import api
from .config import SolveOptions
from .errors import InputError, ModelError, VerificationError
from .options import BN_STATISTICS_TRAIN_RTOL, DEFAULT_RTOL
from .report import Report

__all__ = ["rescale_module", "load_rescaled", "export_module", "ModuleRescaling", "ModuleCheck", "ExportError", "EXPORTERS",
           "PathConditioner", "ConditionerStep", "OPTIMIZER_STATE", "carry_optimizer_state"]

EXPORTERS = ("legacy", "dynamo")
DEFAULT_EXPORTER = "legacy"

# The options of `rescale` that make no sense here: the module must get a rescaled model back.
_REFUSED_OPTIONS = {"dry_run": "a dry run rescales nothing", "input_shapes": "the shapes come from the example input"}

_TORCH_DTYPES = {TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64,
                 TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16}
_PRECISION_OF = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                 torch.bfloat16: "bfloat16"}

_KEEP_NAMES_HINT = ("use onnx_pathcond.torch.rescale_module, or export with onnx_pathcond.torch.export_module (or "
                    "torch.onnx.export(..., dynamo=False, training=torch.onnx.TrainingMode.PRESERVE, "
                    "do_constant_folding=False) on the module in eval mode)")


class ExportError(ModelError):
    """PyTorch could not export the module to ONNX."""


# ---------------------------------------------------------------------------- records
@dataclass
class ModuleCheck:
    """The module's outputs after rescaling against before, on the example input.

    `max_rel[mode]` is the largest difference over all outputs, each relative to its own scale
    (its largest magnitude), in "eval" and "train" mode; `rtol` is what was accepted, and
    `train_rtol` what was accepted in train mode when that differs (with `bn_statistics`,
    training mode is exact only up to the BatchNorms' ε)."""

    rtol: float
    max_rel: Dict[str, float] = field(default_factory=dict)
    train_rtol: Optional[float] = None

    def accepted(self, mode: str) -> float:
        return self.train_rtol if mode == "train" and self.train_rtol is not None else self.rtol

    @property
    def passed(self) -> bool:
        return all(value <= self.accepted(mode) for mode, value in self.max_rel.items())


@dataclass
class ModuleRescaling:
    """What `rescale_module` did.

    `loaded`: the names (as in `module.named_parameters()` / `named_buffers()`, tied names
    included) of the tensors written back; `max_abs_log_factor[name]`: the largest |log(new /
    old)| over that tensor's non-zero elements (a weight into a neuron scaled by λ moves by λ,
    one out of it by 1/λ, one between neurons scaled by λ and μ by λ/μ); `exporter`: which ONNX
    exporter produced the file the tool worked on; `check`: the PyTorch check (None when
    `check=False`); `report`: the tool's own report (`report.summary()`, `report.to_dict()`)."""

    report: Report
    loaded: List[str]
    max_abs_log_factor: Dict[str, float]
    exporter: str
    check: Optional[ModuleCheck] = None

    @property
    def changed(self) -> List[str]:
        """The loaded tensors whose values moved."""
        return [name for name, value in self.max_abs_log_factor.items() if value > 0]

    def summary(self, verbose: bool = False) -> str:
        lines = [self.report.summary(verbose)]
        worst = max(self.max_abs_log_factor.values(), default=0.0)
        lines.append(f"  module     {len(self.loaded)} tensors loaded back by name ({len(self.changed)} changed, "
                     f"largest |log factor| {worst:.3g}), exported with the {self.exporter} exporter")
        if self.check is not None:
            modes = ", ".join(f"{mode} {value:.3g}" for mode, value in self.check.max_rel.items())
            accepted = (f"rtol {self.check.rtol:.3g}" if self.check.train_rtol is None else
                        f"rtol {self.check.rtol:.3g}, in train mode {self.check.train_rtol:.3g}")
            lines.append(f"  module     PyTorch outputs before/after: max difference relative to output scale {modes} "
                         f"({accepted})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- module state
def _module_tensors(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter and buffer by name, tied parameters under each of their names (the ONNX
    file holds one of them; copying into it writes the storage they share)."""
    tensors: Dict[str, torch.Tensor] = {}
    for name, value in module.named_parameters(remove_duplicate=False):
        tensors[name] = value
    for name, value in module.named_buffers(remove_duplicate=False):
        if value is not None:
            tensors[name] = value
    return tensors


class _Snapshot:
    """A copy of every parameter and buffer, and the training flag of every submodule, to put
    back exactly as they were."""

    def __init__(self, module: torch.nn.Module, only: Optional[Iterable[torch.Tensor]] = None):
        """Every parameter and buffer, or only the tensors in `only` (those a step will write)."""
        self.modes = [(m, m.training) for m in module.modules()]
        seen = set()
        self.values = []
        for tensor in (_module_tensors(module).values() if only is None else only):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                self.values.append((tensor, tensor.detach().clone()))

    def restore_values(self) -> None:
        with torch.no_grad():
            for tensor, value in self.values:
                tensor.copy_(value)

    def restore_modes(self) -> None:
        for m, training in self.modes:
            m.training = training

    def restore(self) -> None:
        self.restore_values()
        self.restore_modes()


# ---------------------------------------------------------------------------- inputs / outputs
def _as_args(example_input) -> Tuple[torch.Tensor, ...]:
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise InputError("example_input must be a tensor or a tuple of tensors (the module's positional arguments)")
    return args


def _tensors_in(value) -> List[torch.Tensor]:
    """The tensors of a module's output (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for key in value for t in _tensors_in(value[key])]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors_in(item)]
    return []


def _devices(module: torch.nn.Module, args: Sequence[torch.Tensor]) -> List[int]:
    """CUDA devices whose random streams a forward may draw from (dropout)."""
    found = {t.device.index for t in list(args) + list(_module_tensors(module).values())
             if t.device.type == "cuda"}
    return sorted(i if i is not None else torch.cuda.current_device() for i in found)


def _run(module: torch.nn.Module, args, train: bool, seed: int, snapshot_values: Optional[_Snapshot] = None):
    """The module's outputs in one mode. In train mode the random stream is fixed (the same
    dropout masks on every call, the caller's stream untouched) and the buffers that the
    forward updates (BatchNorm's running statistics, num_batches_tracked) are put back."""
    module.train(train)
    with torch.no_grad():
        if not train:
            return [t.detach().clone() for t in _tensors_in(module(*args))]
        keep = snapshot_values or _Snapshot(module)
        try:
            with torch.random.fork_rng(devices=_devices(module, args)):
                torch.manual_seed(seed)
                return [t.detach().clone() for t in _tensors_in(module(*args))]
        finally:
            keep.restore_values()


def _max_rel(before: List[torch.Tensor], after: List[torch.Tensor]) -> float:
    """Largest difference over the outputs, each relative to its scale (largest magnitude);
    non-finite values must sit at the same places with the same values."""
    if len(before) != len(after):
        return math.inf
    worst = 0.0
    for a, b in zip(before, after):
        if a.shape != b.shape or a.dtype != b.dtype:
            return math.inf
        if not (a.is_floating_point() or a.is_complex()):
            worst = max(worst, 0.0 if torch.equal(a, b) else math.inf)
            continue
        a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
        finite = torch.isfinite(a64)
        if not torch.equal(finite, torch.isfinite(b64)) or not torch.equal(a64[~finite].nan_to_num(),
                                                                             b64[~finite].nan_to_num()):
            return math.inf
        if finite.any():
            scale = a64[finite].abs().max().item() or 1.0
            worst = max(worst, (a64[finite] - b64[finite]).abs().max().item() / scale)
    return worst


# ---------------------------------------------------------------------------- export
@contextlib.contextmanager
def _quiet_exporter():
    """The exporters' deprecation notices and progress chatter are not the user's business
    here; a TracerWarning (a trace that depends on the example input) still shows."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        logger.setLevel(level)


def export_module(module: torch.nn.Module, example_input, path: Union[str, os.PathLike], *,
                  exporter: str = DEFAULT_EXPORTER) -> None:
    """Write `module` to the ONNX file `path` the way `rescale_module` does: in eval mode, every
    parameter and buffer under its own name, BatchNorm kept as BatchNormalization nodes, the
    first axis of each input a dynamic batch. For the manual path: `onnx-pathcond` on that file,
    then `load_rescaled`. The module's train/eval flags are put back; its values are not touched.

    legacy (TorchScript) exporter: `do_constant_folding=False` keeps BatchNorm apart from the
    convolutions and Linear weights under their names (a 3-D input's MatMul reads them through
    a Transpose node instead of a folded copy named `onnx::MatMul_12`);
    `keep_initializers_as_inputs=True` turns off its merging of equal initializers (otherwise
    every BatchNorm of a fresh model reads one all-ones tensor, its running variance included,
    and no channel behind a BatchNorm can be rescaled); the initializers are then taken out of
    the graph inputs again (the tool must see them as constants, not as inputs a caller may
    replace). dynamo exporter: `optimize=False` (its optimiser folds BatchNorm into the
    convolutions under the convolution's name)."""
    if exporter not in EXPORTERS:
        raise InputError(f"unknown exporter '{exporter}' (choose {' or '.join(EXPORTERS)})")
    args = _as_args(example_input)
    path = os.fspath(path)
    names = [f"input_{i}" for i in range(len(args))]
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with _quiet_exporter():
            if exporter == "legacy":
                torch.onnx.export(module, args, path, dynamo=False, input_names=names,
                                  training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                                  keep_initializers_as_inputs=True,
                                  dynamic_axes={n: {0: "batch"} for n, a in zip(names, args) if a.dim() > 0})
            else:
                batch = torch.export.Dim("batch")
                first = next((a.shape[0] for a in args if a.dim() > 0), None)
                shapes = tuple({0: batch} if a.dim() > 0 and a.shape[0] == first else {} for a in args)
                torch.onnx.export(module, args, path, dynamo=True, optimize=False, verbose=False,
                                  input_names=names, dynamic_shapes=shapes)
    except Exception as exc:  # any exporter failure is the module's: said in one line
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        other = [e for e in EXPORTERS if e != exporter][0]
        raise ExportError(f"the {exporter} ONNX exporter failed on the module ({type(exc).__name__}: {first_line}); "
                          f"try exporter='{other}'") from exc
    finally:
        for m, training in flags:
            m.training = training
    if exporter == "legacy":
        model = onnx.load(path)
        stored = {t.name for t in model.graph.initializer}
        inputs = [vi for vi in model.graph.input if vi.name not in stored]
        del model.graph.input[:]
        model.graph.input.extend(inputs)
        large = sum(t.ByteSize() for t in model.graph.initializer) > 1 << 30  # protobuf's limit is 2 GiB
        onnx.save_model(model, path, save_as_external_data=large, location=os.path.basename(path) + ".data")


# ---------------------------------------------------------------------------- names
def _aliases(model: onnx.ModelProto) -> Dict[str, List[str]]:
    """Initializer -> the outputs of the Identity nodes that pass it on unchanged (chains
    included). The legacy exporter, unless told otherwise, stores equal tensors once and names
    the others with such nodes (`bn2.weight = Identity(bn1.weight)`); the tool rescales the
    stored one, and every name it reaches must be loaded."""
    root = {t.name: t.name for t in model.graph.initializer}
    aliases: Dict[str, List[str]] = {}
    for node in model.graph.node:  # nodes are in topological order
        if node.op_type == "Identity" and node.input and node.input[0] in root:
            root[node.output[0]] = root[node.input[0]]
            aliases.setdefault(root[node.input[0]], []).append(node.output[0])
    return aliases


def _targets(name: str, tensors: Dict[str, torch.Tensor], aliases: Dict[str, List[str]]) -> List[str]:
    return [n for n in [name] + aliases.get(name, []) if n in tensors]


def _batchnorm_prefixes(module: torch.nn.Module, only: Optional[set] = None) -> Dict[int, Tuple[torch.nn.Module, List[str]]]:
    """Every BatchNorm submodule (by id) with all the names it goes by (a shared one has several)."""
    found: Dict[int, Tuple[torch.nn.Module, List[str]]] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm) and (only is None or id(sub) in only):
            found.setdefault(id(sub), (sub, []))[1].append(prefix)
    return found


def _check_batchnorm_kept(module: torch.nn.Module, present: set, where: str, only: Optional[set] = None) -> None:
    """A BatchNorm module whose weight (or running mean, when it has no weight) is not in the
    ONNX model by name was folded into a convolution by the exporter: the weights of that
    convolution, under its own name or a generated one, hold folded values."""
    for sub, prefixes in _batchnorm_prefixes(module, only).values():
        kind = "weight" if sub.affine else ("running_mean" if sub.running_mean is not None else None)
        if kind is None:
            continue
        if not any(f"{p}.{kind}" in present for p in prefixes):
            raise ModelError(f"BatchNorm '{prefixes[0]}' has no '{prefixes[0]}.{kind}' in {where}: the exporter folded "
                             f"BatchNorm into the preceding layer, whose weights then hold folded values; "
                             f"{_KEEP_NAMES_HINT}")


def _tensor_of(proto: TensorProto, base_dir: Optional[str]) -> torch.Tensor:
    array = numpy_helper.to_array(proto, base_dir or "")
    dtype = _TORCH_DTYPES.get(proto.data_type)
    if proto.data_type == TensorProto.BFLOAT16:  # numpy has no bfloat16 torch can read: through float32, exactly
        return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(torch.bfloat16)
    value = torch.from_numpy(np.array(array, copy=True))
    return value if dtype is None else value.to(dtype)


def _check_fits(name: str, target: torch.Tensor, value: torch.Tensor, source: str) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise ModelError(f"'{name}' has shape {list(value.shape)} in {source} but {list(target.shape)} in the module")
    if target.dtype != value.dtype:
        raise ModelError(f"'{name}' is {str(value.dtype).replace('torch.', '')} in {source} but "
                         f"{str(target.dtype).replace('torch.', '')} in the module")


def _write(plan: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for target, value in plan:
            target.copy_(value.to(target.device))


def _with_tied_names(names: List[str], tensors: Dict[str, torch.Tensor]) -> List[str]:
    """`names`, each followed by the other names of the same tensor (tied parameters), once each."""
    by_id: Dict[int, List[str]] = {}
    for name, tensor in tensors.items():
        by_id.setdefault(id(tensor), []).append(name)
    result: List[str] = []
    for name in names:
        result.extend(n for n in by_id[id(tensors[name])] if n not in result)
    return result


def _max_abs_log_factor(before: torch.Tensor, after: torch.Tensor) -> float:
    old, new = before.detach().to(torch.float64).cpu(), after.detach().to(torch.float64).cpu()
    moved = (old != 0) & (new != 0)
    if not moved.any():
        return 0.0
    return (new[moved] / old[moved]).abs().log().abs().max().item()


# ---------------------------------------------------------------------------- rescale_module
def rescale_module(module: torch.nn.Module, example_input, *, exporter: str = DEFAULT_EXPORTER, check: bool = True,
                   check_rtol: Optional[float] = None, check_seed: int = 0, **options) -> ModuleRescaling:
    """Rescale `module`'s parameters and buffers in place with PathCond; returns what changed.

    `example_input` is a tensor or a tuple of tensors (the module's positional arguments); its
    first axis is exported as a dynamic batch, and its values are the input of the PyTorch
    check. `options` are those of `onnx_pathcond.rescale` (solver, max_iter, tol, backend,
    device, verify_output, rtol, seed, progress, output to also save the rescaled ONNX file,
    …), passed on as they are.

    The module is exported in eval mode (`exporter`: "legacy", the TorchScript exporter, or
    "dynamo"; see `export_module` for the settings), the tool rescales that file, and every tensor the
    report lists as rewritten is copied into the parameter or buffer of that name. Before any
    copy, each rewritten tensor must be a parameter or buffer of the module with its shape and
    dtype, and its value in the exported file must be the module's own; a BatchNorm module that
    ran in the forward must still be a BatchNorm in the file.

    With `check` (default), the module's outputs on `example_input` are compared before and
    after, in eval and in train mode (in train mode with a fixed random stream, so dropout draws
    the same masks, and with the buffers the forward updates put back). Each output's largest
    difference relative to its own scale must be at most `check_rtol`, by default the
    tolerance of the tool's own check (`rtol`: 1e-5 for a float32 model, 1e-2 for float16), or
    that precision's default when its check was turned off.

    On any failure (export, tool, names, check) the module's values and the train/eval flag of
    every submodule are as they were found, and a `PathCondError` is raised. On success the
    flags are put back too. The caller's random stream is not consumed.
    """
    if exporter not in EXPORTERS:
        raise InputError(f"unknown exporter '{exporter}' (choose {' or '.join(EXPORTERS)})")
    refused = [key for key in options if key in _REFUSED_OPTIONS]
    if refused:
        raise InputError(f"rescale_module does not take {refused[0]}= ({_REFUSED_OPTIONS[refused[0]]})")
    if check_rtol is not None and not 0 <= check_rtol < math.inf:
        raise InputError(f"check_rtol must be a finite number >= 0, not {check_rtol}")
    args = _as_args(example_input)
    tensors = _module_tensors(module)
    found = _Snapshot(module)
    try:
        used_batchnorm = set()
        hooks = [sub.register_forward_hook(lambda m, i, o: used_batchnorm.add(id(m)))
                 for sub in module.modules() if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm)]
        try:
            reference = {"eval": _run(module, args, False, check_seed)}
        finally:
            for hook in hooks:
                hook.remove()
        if check:
            reference["train"] = _run(module, args, True, check_seed, found)

        with tempfile.TemporaryDirectory(prefix="onnx-pathcond-") as folder:
            path = os.path.join(folder, "module.onnx")
            export_module(module, args, path, exporter=exporter)
            exported = onnx.load(path, load_external_data=False)
            rescaled, report = api.rescale(path, **options)
            report.input = f"{type(module).__name__} (torch module, {exporter} export)"  # not the temporary file
            plan, written = _plan_rewritten(report, exported, rescaled, folder, tensors, module, used_batchnorm)
        rewritten = _with_tied_names(written, tensors)

        before = {name: tensors[name].detach().clone() for name in rewritten}
        _write(plan)
        factors = {name: _max_abs_log_factor(before[name], tensors[name]) for name in rewritten}
        result = ModuleRescaling(report=report, loaded=rewritten, max_abs_log_factor=factors, exporter=exporter)
        if check:
            result.check = _check(module, args, reference, report, check_rtol, check_seed,
                                  bool(options.get("bn_statistics")))
    except BaseException:
        found.restore()
        raise
    found.restore_modes()
    return result


def _plan_rewritten(report: Report, exported: onnx.ModelProto, rescaled: onnx.ModelProto, folder: str,
                    tensors: Dict[str, torch.Tensor], module: torch.nn.Module, used_batchnorm: set):
    """(module tensor, new value) for every rewritten tensor and every name it goes by, after
    checking names, shapes, dtypes and that the exported value is the module's own."""
    aliases = _aliases(exported)
    original = {t.name: t for t in exported.graph.initializer}
    new = {t.name: t for t in rescaled.graph.initializer}
    present = set(original) | {n for names in aliases.values() for n in names}
    _check_batchnorm_kept(module, present, "the exported model", only=used_batchnorm)
    plan, loaded = [], []
    for record in report.rewritten:
        targets = _targets(record.name, tensors, aliases)
        if not targets or record.name not in new or record.name not in original:
            raise ModelError(f"the tool rescaled '{record.name}' ({record.role} of {record.op_type} '{record.consumer}'), "
                             f"which is not a parameter or buffer of the module (a tensor the forward makes, or a name "
                             f"the exporter gave): it cannot be loaded back; nothing was changed")
        exported_value = _tensor_of(original[record.name], folder)
        value = _tensor_of(new[record.name], folder)
        for name in targets:
            _check_fits(name, tensors[name], value, "the exported model")
            if not torch.equal(tensors[name].detach().cpu(), exported_value):
                raise ModelError(f"'{name}' in the exported model is not the module's '{name}' (the exporter changed "
                                 f"its values): the rescaled values cannot be loaded back; nothing was changed")
            plan.append((tensors[name], value))
            loaded.append(name)
    return plan, loaded


def _check(module, args, reference, report: Report, check_rtol: Optional[float], seed: int,
           bn_statistics: bool = False) -> ModuleCheck:
    """The outputs after against before, in each mode; a mismatch raises (the caller restores)."""
    given = check_rtol is not None
    if check_rtol is None:
        if report.verification is not None:
            check_rtol = report.verification.rtol
        else:
            dtypes = {t.dtype for t in _module_tensors(module).values() if t.dtype in _PRECISION_OF}
            order = ["bfloat16", "float16", "float32", "float64"]
            precision = min((_PRECISION_OF[d] for d in dtypes), key=order.index, default="float32")
            check_rtol = DEFAULT_RTOL[precision]
    result = ModuleCheck(rtol=check_rtol)
    if bn_statistics and not given:  # train mode computes the original with ε/λ² (README, "BatchNorm statistics")
        result.train_rtol = max(check_rtol, BN_STATISTICS_TRAIN_RTOL)
    for mode, before in reference.items():
        after = _run(module, args, mode == "train", seed)
        result.max_rel[mode] = _max_rel(before, after)
        if not result.max_rel[mode] <= result.accepted(mode):
            why = ("with bn_statistics a BatchNorm in train mode normalises with ε/λ² in place of ε, which moves "
                   "channels of small batch variance; pass check_rtol= to accept more, or leave bn_statistics off"
                   if bn_statistics and mode == "train" else
                   "the module does something its eval-mode ONNX export does not show")
            raise VerificationError(
                f"the rescaled module's outputs differ from the original's in {mode} mode by "
                f"{result.max_rel[mode]:.3g} relative to their scale (rtol {result.accepted(mode):.3g}): {why}; "
                f"its weights were put back")
    return result


# ---------------------------------------------------------------------------- load_rescaled
def load_rescaled(module: torch.nn.Module, model: Union[str, os.PathLike, onnx.ModelProto]) -> List[str]:
    """Copy the tensors of a rescaled ONNX model into `module`'s parameters and buffers of the
    same names, in place; returns the names loaded (tied parameters under each name).

    For a file that the command line rescaled, exported from this module. Nothing is written
    unless every check passes:
    * every BatchNorm module's weight is in the file by name (else the exporter folded it);
    * every initializer named after a parameter or buffer has its shape and dtype (so do the
      names the legacy exporter gives equal tensors it stores once: `bn2.weight =
      Identity(bn1.weight)` loads into both);
    * an initializer under another name (`onnx::MatMul_12`, a Linear weight that the legacy
      exporter stored transposed under a generated name when it folded constants) is refused
      when it has the shape of a parameter or buffer (or of its transpose) without holding its
      values (or their transpose): it may have been rescaled, and its values cannot be mapped
      back. Other initializers are constants of the graph and are left alone.
    A BatchNorm module that the forward never calls has no weight in the file either: it counts as
    folded (`rescale_module` only checks the BatchNorm modules its forward ran).
    """
    if isinstance(model, onnx.ModelProto):
        proto, base_dir, where = model, None, "the model"
    else:
        proto = api.load_model(model)  # the package's one-line errors for a bad file
        base_dir, where = os.path.dirname(os.fspath(model)), f"'{os.fspath(model)}'"
    tensors = _module_tensors(module)
    aliases = _aliases(proto)
    initializers = {t.name: t for t in proto.graph.initializer}
    present = set(initializers) | {n for names in aliases.values() for n in names}
    _check_batchnorm_kept(module, present, where)

    by_shape: Dict[Tuple[int, ...], List[torch.Tensor]] = {}
    for tensor in tensors.values():
        if tensor.is_floating_point():
            by_shape.setdefault(tuple(tensor.shape), []).append(tensor)

    plan, loaded = [], []
    for name, proto_tensor in initializers.items():
        targets = _targets(name, tensors, aliases)
        if not targets and proto_tensor.data_type not in _TORCH_DTYPES:
            continue
        value = _tensor_of(proto_tensor, base_dir)
        if targets:
            for target in targets:
                _check_fits(target, tensors[target], value, where)
                plan.append((tensors[target], value))
                loaded.append(target)
            continue
        shape = tuple(value.shape)
        transposed = shape[::-1] if len(shape) == 2 else None
        same = by_shape.get(shape, [])
        flipped = by_shape.get(transposed, []) if transposed is not None else []
        if not same and not flipped:
            continue  # a constant of the graph, nothing of the module's
        if any(torch.equal(t.detach().cpu().to(value.dtype), value) for t in same) or \
                any(torch.equal(t.detach().cpu().to(value.dtype).T, value) for t in flipped):
            continue  # an unchanged copy of a module tensor under another name
        raise ModelError(f"initializer '{name}' in {where} has the shape of a parameter of the module "
                         f"{'(transposed) ' if flipped and not same else ''}but no parameter or buffer by that name, "
                         f"and its values are no module tensor's: the exporter renamed it (constant folding) and "
                         f"it cannot be loaded back by name; {_KEEP_NAMES_HINT}")
    if not plan:
        raise ModelError(f"no tensor of {where} is named after a parameter or buffer of the module")
    _write(plan)
    return _with_tied_names(loaded, tensors)


# ---------------------------------------------------------------------------- optimizer state
# How each optimizer's per-parameter state follows a parameter multiplied by f (element-wise):
# the gradient at the new point is the old one divided by f, so a running mean of gradients
# (a first moment) is divided by f, a running mean of squared gradients by f². Entries that
# are counters or scalars (Adam's `step`) stay. Only these exact classes are known: a subclass
# may keep other state, so it is refused like any other.
_FIRST, _SECOND, _SCALAR = 1, 2, 0
OPTIMIZER_STATE = {
    torch.optim.SGD: {"momentum_buffer": _FIRST},
    torch.optim.Adam: {"exp_avg": _FIRST, "exp_avg_sq": _SECOND, "max_exp_avg_sq": _SECOND, "step": _SCALAR},
    torch.optim.AdamW: {"exp_avg": _FIRST, "exp_avg_sq": _SECOND, "max_exp_avg_sq": _SECOND, "step": _SCALAR},
    torch.optim.RMSprop: {"square_avg": _SECOND, "momentum_buffer": _FIRST, "grad_avg": _FIRST, "step": _SCALAR},
    torch.optim.Adagrad: {"sum": _SECOND, "step": _SCALAR},
}


def _state_rule(optimizer: torch.optim.Optimizer, changed: Dict[int, torch.Tensor], reset_state: bool):
    """What to do with the state of each changed parameter: ("carry", rules) or ("reset", None);
    a one-line error, before anything changes, for state this module does not know."""
    rules = OPTIMIZER_STATE.get(type(optimizer))
    if rules is None:
        if reset_state:
            return "reset", None
        raise InputError(f"optimizer {type(optimizer).__name__} is not one whose state can be carried into the "
                         f"rescaled coordinates (known: {', '.join(c.__name__ for c in OPTIMIZER_STATE)}); pass "
                         f"reset_state=True to clear the state of the rescaled parameters instead")
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in changed:
                continue
            unknown = [key for key in optimizer.state.get(p, {}) if key not in rules]
            if unknown:
                if reset_state:
                    return "reset", None
                raise InputError(f"{type(optimizer).__name__} keeps state '{unknown[0]}' for a rescaled parameter, "
                                 f"which onnx_pathcond.torch does not know how to carry; pass reset_state=True to "
                                 f"clear that state instead")
    return "carry", rules


def carry_optimizer_state(optimizer: torch.optim.Optimizer, factors: Dict[int, Tuple[torch.Tensor, torch.Tensor]],
                          rules: Optional[dict]) -> int:
    """Bring the state of each parameter in `factors` (id -> (parameter, factor new/old)) into
    the new coordinates: first moments divided by f, second moments by f² (in float64, cast
    back); with `rules` None, that state is cleared. Returns the state tensors changed."""
    changed = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in factors or p not in optimizer.state:
                continue
            state = optimizer.state[p]
            if rules is None:
                changed += len(state)
                state.clear()
                continue
            factor = factors[id(p)][1]
            for key, value in state.items():
                power = rules[key]
                if power == _SCALAR or not torch.is_tensor(value) or value.shape != p.shape:
                    continue
                f = factor.to(value.device)
                with torch.no_grad():
                    value.copy_((value.to(torch.float64) / f ** power).to(value.dtype))
                changed += 1
    return changed


# ---------------------------------------------------------------------------- PathConditioner
# A conditioner passes on the options of a solve (config.SolveOptions); the others of `rescale`
# make no sense here (there is no ONNX file to write or check: the module itself is checked).


@dataclass
class ConditionerStep(ModuleRescaling):
    """What one `PathConditioner.rescale` did: `ModuleRescaling`'s fields (here
    `max_abs_log_factor` is the largest |log f| over every element, zeros included), `factors`
    (module tensor name -> its element-wise factor new/old, float64 on the CPU, for every
    changed tensor), `state_changed` (optimizer state tensors carried or cleared) and
    `reanalysed` (the new values changed what the analysis had read: it ran again)."""

    factors: Dict[str, torch.Tensor] = field(default_factory=dict)
    state_changed: int = 0
    reanalysed: bool = False


class PathConditioner:
    """Rescale a module again and again during training, analysing it once.

        cond = PathConditioner(model, example_batch, optimizer)
        for epoch in range(epochs):
            train_one_epoch(model, optimizer)
            if epoch % 20 == 0:
                cond.rescale(max_iter=1)          # the authors' schedule step

    The module is exported (in eval mode, as `rescale_module` does) and analysed once, when
    the conditioner is made. Each `rescale(**overrides)` reads the module's current parameters
    and buffers, solves the criterion on them (`options` of `rescale_module`: criterion, solver,
    max_iter, tol, bn_statistics, backend, device, precision; `overrides` replace them for one call,
    bn_statistics excepted: it shapes the analysis) and writes the rescaled values into the same
    tensors, in place.

    The optimizer's state, if one is given, is carried into the new coordinates element by
    element (`OPTIMIZER_STATE`: first moments divided by the factor, second moments by its
    square). An optimizer or state entry not in that table is refused with a one-line error
    before anything changes, unless `reset_state=True`, which clears the state of the rescaled
    parameters instead. With `check`, the module's outputs on the example input must stay the
    same in eval and train mode; on any failure the module's values and modes and the
    optimizer's state are put back as they were, and a `PathCondError` is raised.
    """

    def __init__(self, module: torch.nn.Module, example_input, optimizer: Optional[torch.optim.Optimizer] = None, *,
                 exporter: str = DEFAULT_EXPORTER, reset_state: bool = False, check: bool = True,
                 check_rtol: Optional[float] = None, check_seed: int = 0, bn_statistics: bool = False,
                 **options):
        from .plan import RescalingPlan

        if exporter not in EXPORTERS:
            raise InputError(f"unknown exporter '{exporter}' (choose {' or '.join(EXPORTERS)})")
        self.options = self._check_options(SolveOptions(), options)
        if check_rtol is not None and not 0 <= check_rtol < math.inf:
            raise InputError(f"check_rtol must be a finite number >= 0, not {check_rtol}")
        self.module, self.optimizer = module, optimizer
        self.args = _as_args(example_input)
        self.exporter, self.reset_state = exporter, reset_state
        self.check, self.check_rtol, self.check_seed = check, check_rtol, check_seed
        self.bn_statistics = bn_statistics
        if optimizer is not None:  # refused now, not at the first rescale
            _state_rule(optimizer, {}, reset_state)
        self.tensors = _module_tensors(module)
        used_batchnorm = set()
        hooks = [sub.register_forward_hook(lambda m, i, o: used_batchnorm.add(id(m)))
                 for sub in module.modules() if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm)]
        flags = [(m, m.training) for m in module.modules()]
        try:
            with torch.no_grad():
                module.eval()
                module(*self.args)
        finally:
            for hook in hooks:
                hook.remove()
            for m, training in flags:
                m.training = training
        with tempfile.TemporaryDirectory(prefix="onnx-pathcond-") as folder:
            path = os.path.join(folder, "module.onnx")
            export_module(module, self.args, path, exporter=exporter)
            exported = onnx.load(path)  # external data included: the plan holds the model in memory
        aliases = _aliases(exported)
        present = {t.name for t in exported.graph.initializer} | {n for names in aliases.values() for n in names}
        _check_batchnorm_kept(module, present, "the exported model", only=used_batchnorm)
        # initializer name -> the module tensors of that name (tied names and Identity aliases)
        self.targets: Dict[str, List[str]] = {}
        for tensor in exported.graph.initializer:
            targets = _targets(tensor.name, self.tensors, aliases)
            if targets:
                value = _tensor_of(tensor, None)
                for name in targets:
                    _check_fits(name, self.tensors[name], value, "the exported model")
                    if not torch.equal(self.tensors[name].detach().cpu(), value):
                        raise ModelError(f"'{name}' in the exported model is not the module's '{name}' (the exporter "
                                         f"changed its values): its rescaled values could not be loaded back")
                self.targets[tensor.name] = targets
        self.plan = RescalingPlan(exported, bn_statistics=bn_statistics)
        foreign = [name for name in self.plan.parameters if name not in self.targets]
        if foreign:
            raise ModelError(f"the tool would rescale '{foreign[0]}', which is not a parameter or buffer of the module "
                             f"(a tensor the forward makes, or a name the exporter gave): it could not be loaded back")
        self.steps = 0

    @staticmethod
    def _check_options(given: SolveOptions, changes: dict) -> SolveOptions:
        """`given` with `changes`, which must be options of a solve (checked as SolveOptions are)."""
        unknown = [key for key in changes if key not in SolveOptions.names()]
        if unknown:
            raise InputError(f"PathConditioner does not take {unknown[0]}= (it takes {', '.join(SolveOptions.names())}, "
                             f"bn_statistics, exporter, reset_state, check, check_rtol, check_seed)")
        return given.replace(**changes)

    def _current_values(self) -> Dict[str, np.ndarray]:
        """Every exported tensor's value in the module now, as the plan's dtype."""
        values = {}
        for name, targets in self.targets.items():
            tensor = self.tensors[targets[0]].detach().cpu()
            held = self.plan.value(name)
            if tensor.dtype == torch.bfloat16:
                values[name] = tensor.to(torch.float32).numpy().astype(held.dtype)
            else:
                values[name] = tensor.numpy().astype(held.dtype, copy=True)
        return values

    def rescale(self, **overrides) -> ConditionerStep:
        """Rescale the module's current parameters in place (see the class); returns what changed."""
        if "bn_statistics" in overrides:
            raise InputError("bn_statistics shapes the analysis: give it when making the PathConditioner")
        options = self._check_options(self.options, overrides)
        module, optimizer = self.module, self.optimizer
        # Without the check only the rescaled tensors change: they are copied once known, below.
        found = _Snapshot(module) if self.check else _Snapshot(module, only=())
        saved_state = None
        try:
            if self.check:
                reference = {"eval": _run(module, self.args, False, self.check_seed),
                             "train": _run(module, self.args, True, self.check_seed, found)}
            reanalysed = self.plan.update(self._current_values())
            solution = self.plan.solve(options)
            factors = self.plan.factors(solution.u)
            report = Report(input=f"{type(module).__name__} (torch module, {self.exporter} export, step "
                                  f"{self.steps + 1})")
            report.describe_analysis(self.plan.graph, self.plan.analysis, self.plan.groups, external_tensors=0)
            if solution.runtime is not None:
                report.describe_statistics(solution.runtime)
            report.describe_solution(self.plan.graph, self.plan.analysis, self.plan.groups, solution,
                                     solution.settings.max_iter, solution.settings.tol)
            by_id: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
            step_factors, plan, loaded, moved = {}, [], [], {}
            for name, factor in factors.items():
                targets = self.targets[name]
                first = self.tensors[targets[0]]
                full = torch.from_numpy(np.array(factor.full(tuple(first.shape)), dtype=np.float64))
                # the rewrite's arithmetic: in float64, cast back to the tensor's dtype
                old = first.detach().to(device="cpu", dtype=torch.float64)
                value = ((old + factor.offset) * full - factor.offset if factor.offset else old * full).to(first.dtype)
                largest = factor.largest_log()
                for target in targets:
                    plan.append((self.tensors[target], value))
                    loaded.append(target)
                    step_factors[target] = full
                moved[id(first)] = largest
                by_id[id(first)] = (first, full)
            if optimizer is not None:
                _, rules = _state_rule(optimizer, by_id, self.reset_state)
                saved_state = _copy_state(optimizer, by_id)
            rewritten = _with_tied_names(loaded, self.tensors)
            if not self.check:
                found = _Snapshot(module, only=[target for target, _ in plan])
            _write(plan)
            state_changed = carry_optimizer_state(optimizer, by_id, rules) if optimizer is not None else 0
            moved = {name: moved[id(self.tensors[name])] for name in rewritten}
            result = ConditionerStep(report=report, loaded=rewritten, max_abs_log_factor=moved, exporter=self.exporter,
                                     factors=step_factors, state_changed=state_changed, reanalysed=reanalysed)
            if self.check:
                result.check = _check(module, self.args, reference, report, self.check_rtol, self.check_seed,
                                      self.bn_statistics)
        except BaseException:
            found.restore()
            if saved_state is not None:
                _restore_state(optimizer, saved_state)
            raise
        found.restore_modes()
        self.steps += 1
        return result


def _from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True)).to(dtype)


def _copy_state(optimizer: torch.optim.Optimizer, params: Dict[int, Tuple[torch.Tensor, torch.Tensor]]):
    """The state of the given parameters, copied, to put back on a failure."""
    saved = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in params and p in optimizer.state:
                saved[p] = {k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v))
                            for k, v in optimizer.state[p].items()}
    return saved


def _restore_state(optimizer: torch.optim.Optimizer, saved) -> None:
    for p, state in saved.items():
        current = optimizer.state[p]
        current.clear()
        current.update(state)
