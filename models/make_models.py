"""Export the model zoo of ``models/zoo.py`` to small ONNX files in ``models/``.

    python models/make_models.py            # (re)writes models/*.onnx and models/MANIFEST.json
    python models/make_models.py --dump     # also prints every graph, node by node

Exporters and variants:

* families without BatchNorm (mlp, mlp_unbalanced, cnn, conv1d):
  ``<family>.onnx`` (legacy TorchScript exporter, opset 17) and ``<family>.dynamo.onnx``
  (dynamo exporter, its default opset) -- the dynamo file only where its node op_type sequence
  differs from the legacy one.
* BatchNorm families: ``<family>.legacy_fused.onnx`` (legacy, eval, constant folding),
  ``<family>.legacy_bn.onnx`` (legacy, ``TrainingMode.PRESERVE``, no constant folding),
  ``<family>.dynamo_fused.onnx`` (dynamo, default ``optimize=True``),
  ``<family>.dynamo_bn.onnx`` (dynamo, ``optimize=False``).
* ``helper_mlp.onnx``: built with ``onnx.helper`` (Constant-node weights, Transpose on a MatMul
  weight, Add bias, Gemm with transB=1, alpha=0.5, beta=2).

Every file is checked with ``onnx.checker.check_model(full_check=True)``, run in onnxruntime
(CPU) and compared with the PyTorch module (or numpy reference) on a random input; any failure
raises.  Whether BN nodes are kept or folded, and whether initializer names are state_dict keys,
is read back from the files and recorded in ``MANIFEST.json``.  Inputs are named ``x`` and
outputs ``y``; the batch dimension is a static 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper, TensorProto

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from models.zoo import BN_FAMILIES, FAMILIES, build  # noqa: E402

LEGACY_OPSET = 17
DYNAMO_OPSET = None  # the exporter's default (20 with torch 2.13)
RTOL = 1e-4
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


# ----------------------------------------------------------------------------------------------
# exporters
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """Silence exporter chatter (progress prints, deprecation warnings, torchvision notices)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_legacy(module, x, **kw) -> onnx.ModelProto:
    buf = io.BytesIO()
    with _quiet():
        torch.onnx.export(
            module, (x,), buf, dynamo=False, opset_version=LEGACY_OPSET,
            input_names=["x"], output_names=["y"], **kw,
        )
    return onnx.load_from_string(buf.getvalue())


# node metadata the dynamo exporter writes that we drop: the Python stack trace embeds absolute
# paths of this checkout and of the virtual environment (files would differ between machines)
_DROP_METADATA = {"pkg.torch.onnx.stack_trace"}


def export_dynamo(module, x, optimize=True) -> onnx.ModelProto:
    with _quiet():
        prog = torch.onnx.export(
            module, (x,), dynamo=True, opset_version=DYNAMO_OPSET, optimize=optimize,
            input_names=["x"], output_names=["y"],
        )
    model = prog.model_proto
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key not in _DROP_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    return model


def make_helper_mlp(seed: int = 0):
    """x[1,16] -MatMul(Transpose(Constant W1[32,16]))- +Constant b1 -Relu- Gemm(W2[4,32], b2, transB=1,
    alpha=0.5, beta=2) -> y[1,4].  Returns ``(model, reference_fn)``."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((32, 16)) / 4).astype(np.float32)  # stored [out, in], transposed in-graph
    b1 = (rng.standard_normal(32) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((4, 32)) / np.sqrt(32)).astype(np.float32)
    b2 = (rng.standard_normal(4) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["fc1.weight"], name="fc1_weight_const",
                         value=numpy_helper.from_array(w1, "fc1.weight")),
        helper.make_node("Constant", [], ["fc1.bias"], name="fc1_bias_const",
                         value=numpy_helper.from_array(b1, "fc1.bias")),
        helper.make_node("Transpose", ["fc1.weight"], ["fc1.weight_T"], name="fc1_transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "fc1.weight_T"], ["fc1_mm"], name="fc1_matmul"),
        helper.make_node("Add", ["fc1_mm", "fc1.bias"], ["fc1_out"], name="fc1_add"),
        helper.make_node("Relu", ["fc1_out"], ["relu1"], name="relu1"),
        helper.make_node("Gemm", ["relu1", "fc2.weight", "fc2.bias"], ["y"], name="fc2_gemm",
                         transB=1, alpha=0.5, beta=2.0),
    ]
    graph = helper.make_graph(
        nodes, "helper_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(w2, "fc2.weight"), numpy_helper.from_array(b2, "fc2.bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                              producer_name="onnx-pathcond models/make_models.py")

    def reference(xv):
        h = np.maximum(xv @ w1.T + b1, 0.0)
        return 0.5 * (h @ w2.T) + 2.0 * b2

    return model, reference


# ----------------------------------------------------------------------------------------------
# checks and analysis
# ----------------------------------------------------------------------------------------------


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x})
    return out


def check_file(path: Path, ref_fn, shape) -> float:
    """checker (full), static batch-1 input, ORT vs reference; returns the relative error."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    assert len(inputs) == 1, f"{path.name}: expected one graph input, got {[i.name for i in inputs]}"
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in inputs[0].type.tensor_type.shape.dim]
    assert dims == list(shape), f"{path.name}: input shape {dims} != static {list(shape)}"
    rng = np.random.default_rng(1234)
    x = rng.standard_normal(shape).astype(np.float32)
    got = run_ort(model, x)
    want = ref_fn(x)
    assert got.shape == want.shape, f"{path.name}: output shape {got.shape} != {want.shape}"
    err = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))
    if not err <= RTOL:
        raise AssertionError(f"{path.name}: ORT output differs from the reference, relative error {err:.3g} > {RTOL}")
    return err


def count_bn_modules(module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def analyse(model: onnx.ModelProto, module) -> dict:
    """Read the truth back from the file: BN nodes, folding, initializer names vs state_dict."""
    ops = [n.op_type for n in model.graph.node]
    n_bn_nodes = ops.count("BatchNormalization")
    n_bn_modules = count_bn_modules(module) if module is not None else 0
    state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()} if module is not None else {}

    # float initializers that stand for a parameter/buffer: every float initializer that is a
    # state_dict key, or that has more than one element (scalar constants such as Clip bounds
    # are not parameters)
    param_inits, unmatched, value_mismatch = [], [], []
    for init in model.graph.initializer:
        if init.data_type not in FLOAT_TYPES:
            continue
        numel = int(np.prod(init.dims)) if len(init.dims) else 1
        if init.name not in state and numel <= 1:
            continue
        param_inits.append(init.name)
        if init.name not in state:
            unmatched.append(init.name)
            continue
        arr = numpy_helper.to_array(init)
        ref = state[init.name]
        if arr.shape != ref.shape or not np.array_equal(arr.astype(ref.dtype), ref):
            value_mismatch.append(init.name)

    present = set(param_inits)
    float_state_keys = [k for k, v in state.items() if np.issubdtype(v.dtype, np.floating)]
    missing = [k for k in float_state_keys if k not in present]

    const_nodes = [n for n in model.graph.node if n.op_type == "Constant"]
    float_const_nodes = [
        n.output[0] for n in const_nodes
        if any(a.name == "value" and a.t.data_type in FLOAT_TYPES for a in n.attribute)
    ]
    return {
        "op_types": dict(sorted(Counter(ops).items())),
        "bn_modules": n_bn_modules,
        "bn_nodes": n_bn_nodes,
        "has_batchnorm_nodes": n_bn_nodes > 0,
        "bn_folded": n_bn_modules > n_bn_nodes,
        # the manifest's flag: every parameter-like initializer is a state_dict key AND holds that
        # entry's values, i.e. loading the file's initializers back by name gives the module back
        "names_match_state_dict": module is not None and not unmatched and not value_mismatch,
        # the weaker, purely textual test (true for vgg_bn.dynamo_fused, whose conv weights keep
        # their names but hold BN-folded values)
        "initializer_names_all_in_state_dict": module is not None and not unmatched,
        "initializers_not_in_state_dict": unmatched,
        "initializers_with_state_dict_name_but_other_values": value_mismatch,
        "state_dict_floats_absent_by_name": missing,
        "constant_nodes": len(const_nodes),
        "float_constant_nodes": float_const_nodes,
    }


def dump(model: onnx.ModelProto) -> str:
    lines = [f"opset {[(o.domain or 'ai.onnx', o.version) for o in model.opset_import]} ir {model.ir_version}"]
    for i in model.graph.initializer:
        lines.append(f"  init {i.name} {list(i.dims)} {TensorProto.DataType.Name(i.data_type)}")
    for n in model.graph.node:
        attrs = {}
        for a in n.attribute:
            v = helper.get_attribute_value(a)
            if isinstance(v, TensorProto):
                arr = numpy_helper.to_array(v)
                v = arr.tolist() if arr.size <= 8 else f"tensor{list(arr.shape)}"
            attrs[a.name] = v
        lines.append(f"  {n.op_type} {list(n.input)} -> {list(n.output)} {attrs}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def roundtrip_check(path: Path, family: str, module, info: dict) -> None:
    """Where the manifest says names match, loading the file's initializers by name into a module
    built with other weights must give back the original module exactly."""
    if not info["names_match_state_dict"]:
        return
    from models.zoo import load_onnx_weights_into

    other, shape = build(family, seed=1)
    loaded = load_onnx_weights_into(other, onnx.load(str(path)))
    float_keys = [k for k, v in module.state_dict().items() if v.is_floating_point()]
    if sorted(loaded) != sorted(float_keys):
        raise AssertionError(f"{path.name}: round trip loaded {len(loaded)} of {len(float_keys)} float "
                             f"state_dict entries; missing {sorted(set(float_keys) - set(loaded))}")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        if not torch.equal(other(x), module(x)):
            raise AssertionError(f"{path.name}: module rebuilt from the ONNX initializers differs")


def torch_ref(module):
    def fn(xv):
        with torch.no_grad():
            return module(torch.from_numpy(xv)).numpy()
    return fn


def expected_with_bn_statistics(rescalable: int, frozen: dict) -> dict:
    """The counts with `bn_statistics=True`: every group frozen because it feeds a BatchNorm is a
    neuron then (its scale carried by the running statistics); the others stay as they are. A
    frozen group already holds every channel tied to it, so the freed ones add up."""
    freed = frozen.get("before_bn", 0)
    return {"rescalable": rescalable + freed, "frozen": {k: v for k, v in sorted(frozen.items()) if k != "before_bn"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE), help="output folder (default: models/)")
    ap.add_argument("--dump", action="store_true", help="print every exported graph")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    # idempotent: files a previous run shipped (listed in its manifest) are removed first, so a
    # file this run no longer ships does not linger; other files in the folder are left alone
    old_manifest = out / "MANIFEST.json"
    if old_manifest.exists():
        for e in json.loads(old_manifest.read_text()):
            (out / e["file"]).unlink(missing_ok=True)

    entries = []

    def ship(model, fname, family, exporter, variant, shape, module, ref_fn):
        path = out / fname
        onnx.save(model, str(path))  # no external data: every file is self-contained
        err = check_file(path, ref_fn, shape)
        info = analyse(onnx.load(str(path)), module)
        entry = {
            "file": fname,
            "family": family,
            "exporter": exporter,
            "variant": variant,
            "input_shape": list(shape),
            "has_batchnorm_nodes": info["has_batchnorm_nodes"],
            "bn_folded": info["bn_folded"],
            "names_match_state_dict": info["names_match_state_dict"],
            "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "size_bytes": path.stat().st_size,
            "max_rel_err": float(f"{err:.3g}"),
        }
        entry.update({k: v for k, v in info.items() if k not in entry})
        if module is not None and hasattr(module, "expected_groups"):
            # what the tool should find, from the architecture (zoo.py), for the BatchNorm
            # layers this file kept; "default" is without options (room for option-dependent sets)
            rescalable, frozen = module.expected_groups(fold_batchnorm=info["bn_folded"])
            entry["expected"] = {"default": {"rescalable": rescalable, "frozen": dict(sorted(frozen.items()))},
                                 "bn_statistics": expected_with_bn_statistics(rescalable, frozen)}
        if module is not None:
            roundtrip_check(path, family, module, info)
        entries.append(entry)
        print(f"  {fname:36s} {entry['size_bytes']:>9d} B  BN nodes {info['bn_nodes']}/{info['bn_modules']}"
              f"  names_match={info['names_match_state_dict']}  rel_err={err:.1e}")
        if args.dump:
            print(dump(model))

    for family in FAMILIES:
        module, shape = build(family)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        ref = torch_ref(module)
        print(f"{family}:")
        if family not in BN_FAMILIES:
            legacy = export_legacy(module, x)
            dyn = export_dynamo(module, x)
            ship(legacy, f"{family}.onnx", family, "legacy", "default", shape, module, ref)
            if [n.op_type for n in dyn.graph.node] != [n.op_type for n in legacy.graph.node]:
                ship(dyn, f"{family}.dynamo.onnx", family, "dynamo", "default", shape, module, ref)
            else:
                print(f"  ({family}.dynamo.onnx not shipped: same op_type sequence as the legacy file)")
        else:
            ship(export_legacy(module, x), f"{family}.legacy_fused.onnx", family, "legacy", "eval_fused",
                 shape, module, ref)
            ship(export_legacy(module, x, training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False),
                 f"{family}.legacy_bn.onnx", family, "legacy", "preserve_bn", shape, module, ref)
            ship(export_dynamo(module, x, optimize=True), f"{family}.dynamo_fused.onnx", family, "dynamo",
                 "default", shape, module, ref)
            ship(export_dynamo(module, x, optimize=False), f"{family}.dynamo_bn.onnx", family, "dynamo",
                 "optimize_false", shape, module, ref)
        # exporting must not have touched the module
        assert all(not m.training for m in module.modules()), f"{family}: module left in training mode"

    print("helper_mlp:")
    hm, href = make_helper_mlp()
    ship(hm, "helper_mlp.onnx", "helper_mlp", "onnx.helper", "default", (1, 16), None, href)

    with open(out / "MANIFEST.json", "w") as f:
        json.dump(entries, f, indent=1)
        f.write("\n")
    total = sum(e["size_bytes"] for e in entries)
    print(f"{len(entries)} files, {total / 1e6:.2f} MB in all, {time.time() - t0:.0f} s")
    if total > 7e6:
        raise SystemExit(f"total size {total / 1e6:.2f} MB exceeds the ~7 MB budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
