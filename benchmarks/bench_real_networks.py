"""Real architectures (torchvision, timm) with random weights: what the tool finds in them.

Two modes, run with different environments:

    # 1. export (needs torch, torchvision and optionally timm; nothing is downloaded: random weights)
    python benchmarks/bench_real_networks.py --export benchmarks/.cache/real
    # 2. analyse every .onnx file of the folder with the onnx_pathcond on PYTHONPATH (no torch)
    python benchmarks/bench_real_networks.py benchmarks/.cache/real [--full-below 60] [--json out.json]

The second mode runs each file in a fresh subprocess of the same interpreter (so a run's memory
and time are its own, and PYTHONPATH picks the onnx_pathcond under test: the same folder can be
measured with two checkouts). For each file it runs the analysis (`rescale(..., dry_run=True)`,
what `--dry-run` prints) and, for files below `--full-below` MB, the full rescale with its
verification (the command line's path: `rescale_file(path, out)`, the
written file checked). It prints one row per file: nodes, rescalable groups, frozen groups by
reason class, the barrier ops, whether the check passed ("-" when only the analysis ran), the
tool's time and, for fully rescaled files, the baseline's (`onnx.load` + `onnx.save` + one
onnxruntime CPU inference, session creation included, in its own fresh subprocess right
after the tool's; `--no-baseline` skips it) and their ratio. Neither clock counts the import of
onnx, numpy and onnxruntime.

Exports (`--export`): static batch 1, 3×224×224 input, eval mode, random weights (BatchNorm
statistics too, as a trained network has them); each network twice:
`<name>.legacy.onnx` (TorchScript exporter, opset 17, BatchNorm folded into the convolutions)
and `<name>.dynamo_bn.onnx` (dynamo exporter, `optimize=False`: BatchNorm kept, `chunk` written
as SplitToSequence/SequenceAt). `--exporters` picks others: `dynamo` (`optimize=True`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TORCHVISION = ["shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "densenet121", "resnet18", "resnet50"]
TIMM = ["repvgg_a0", "resnest14d", "dpn68", "resnetv2_50"]
EXPORTERS = ("legacy", "dynamo_bn")
CATEGORIES = ("barrier", "before_bn", "graph_output", "shared_weight", "fixed_weight")


# ------------------------------------------------------------------------------------ export
def _trained_like_batchnorm(module) -> None:
    """BatchNorm statistics and affine parameters of a trained network, seeded. Freshly built,
    every BatchNorm has γ = var = 1 and β = mean = 0: the legacy exporter then stores γ and the
    variance as one tensor, which a trained network never does."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                n = m.num_features
                m.running_mean.copy_((torch.rand(n, generator=g) - 0.5) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_((torch.rand(n, generator=g) - 0.5) * 0.2)


def _export(names, folder: Path, exporters) -> None:
    import contextlib
    import io
    import logging
    import warnings

    import torch

    torch.manual_seed(0)
    builders = {}
    import torchvision.models as tvm

    for name in TORCHVISION:
        builders[name] = lambda name=name: getattr(tvm, name)(weights=None)
    try:
        import timm
    except ImportError:
        print("timm is not installed: its networks are skipped")
    else:
        for name in TIMM:
            builders[name] = lambda name=name: timm.create_model(name, pretrained=False)
    folder.mkdir(parents=True, exist_ok=True)
    for lg in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
        logging.getLogger(lg).setLevel(logging.ERROR)
    x = torch.randn(1, 3, 224, 224)
    for name in names or list(builders):
        if name not in builders:
            print(f"{name}: unknown (known: {', '.join(builders)})")
            continue
        torch.manual_seed(0)
        module = builders[name]().eval()
        _trained_like_batchnorm(module)
        for exporter in exporters:
            path = folder / f"{name}.{exporter}.onnx"
            if path.exists():
                print(f"{path.name}: exists")
                continue
            t0 = time.time()
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    if exporter == "legacy":
                        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17,
                                          input_names=["x"], output_names=["y"])
                    else:
                        program = torch.onnx.export(module, (x,), dynamo=True, optimize=exporter == "dynamo",
                                                    input_names=["x"], output_names=["y"])
                        program.save(str(path))
            except Exception as e:  # an exporter that cannot take the network: say so, go on
                print(f"{path.name}: export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                path.unlink(missing_ok=True)
                continue
            print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB, {time.time() - t0:.0f} s")


# ------------------------------------------------------------------------------------ analyse
def _measure_one(path: str, full: bool, options: dict = None) -> dict:
    """Runs in the child process: the tool on one file, with `options` of `rescale`, as a dict.
    The libraries that the baseline imports before its clock starts (onnx, numpy, onnxruntime)
    are imported before this one starts too, as bench_pipeline.py does (the tool's own modules
    come with `from onnx_pathcond import rescale`, also before it)."""
    import onnx

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass

    import onnx_pathcond
    from onnx_pathcond import rescale

    row = {"file": os.path.basename(path), "size_mb": round(os.path.getsize(path) / 1e6, 1),
           "tool": os.path.dirname(os.path.abspath(onnx_pathcond.__file__))}
    row["nodes"] = len(onnx.load(path, load_external_data=False).graph.node)
    import inspect
    import tempfile

    params = inspect.signature(rescale).parameters
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = dict(options or {})
        if full and "output" in params:  # the command line's path: written, then the written file checked
            kwargs["output"] = os.path.join(tmp, "out.onnx")
            if "return_model" in params:
                kwargs["return_model"] = False
        t0 = time.perf_counter()
        if full and hasattr(onnx_pathcond, "rescale_file"):  # what the command line runs
            kwargs.pop("output", None)
            report = onnx_pathcond.rescale_file(path, os.path.join(tmp, "out.onnx"), **kwargs)
        else:  # an analysis, or an older checkout (rescale's return_model=False was the same path)
            _, report = rescale(path, dry_run=not full, **kwargs)
        row["seconds"] = round(time.perf_counter() - t0, 2)
    d = report.to_dict()
    groups = d["groups"]
    row["rescalable"] = groups["rescalable"]
    row["frozen"] = groups["frozen"]
    row["frozen_by_category"] = groups.get("frozen_by_category", {})
    row["barrier_ops"] = d.get("barrier_ops", {})
    first = {}
    for f in d.get("frozen", []):
        first.setdefault(f["category"], f["reason"])
    row["first_reason"] = first
    verification = d.get("verification") or {}
    row["check"] = (bool(verification.get("passed")) if full else None)
    return row


def _baseline_one(path: str) -> dict:
    """Runs in the child process: the baseline that the tool's time is set against, as in
    bench_pipeline.py: onnx.load + onnx.save + one onnxruntime CPU inference (session
    creation included) on a random input, in seconds."""
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort

    t0 = time.perf_counter()
    model = onnx.load(path)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, os.path.join(tmp, "out.onnx"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        dtype = {"tensor(double)": np.float64, "tensor(float16)": np.float16}.get(i.type, np.float32)
        feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    session.run(None, feeds)
    return {"baseline_seconds": round(time.perf_counter() - t0, 2)}


def _run_child(path: Path, full: bool, timeout: float, options: dict, baseline: bool = False) -> dict:
    """The tool on one file in a fresh subprocess; with `baseline`, then the baseline in another."""
    row = _child(f"b._measure_one({str(path.resolve())!r}, {full}, {options!r})", path, timeout)
    if baseline and full and "error" not in row:
        base = _child(f"b._baseline_one({str(path.resolve())!r})", path, timeout)
        row["baseline_seconds"] = base.get("baseline_seconds")
        if "error" in base:
            row["baseline_error"] = base["error"]
    return row


def _child(call: str, path: Path, timeout: float) -> dict:
    here = Path(__file__).resolve().parent
    code = f"import json; import bench_real_networks as b; print('ROW' + json.dumps({call}))"
    try:
        # run from this folder: `python -c` puts the working directory first on sys.path, and
        # the repository root there would shadow the onnx_pathcond that PYTHONPATH names
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              cwd=here)
    except subprocess.TimeoutExpired:
        return {"file": path.name, "error": f"timed out after {timeout:.0f} s"}
    rows = [line[3:] for line in done.stdout.splitlines() if line.startswith("ROW")]
    if done.returncode or not rows:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"file": path.name, "error": tail[:200]}
    return json.loads(rows[-1])


def _table(rows) -> str:
    head = ["model", "MB", "nodes", "rescalable", "frozen"] + [c.replace("_", " ") for c in CATEGORIES] \
        + ["check", "s", "base s", "tool/base", "barrier ops"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['file']} | " + " | ".join(["-"] * (len(head) - 2)) + f" | {r['error']} |")
            continue
        by = r["frozen_by_category"]
        check = {True: "passed", False: "FAILED", None: "-"}[r["check"]]
        ops = ", ".join(f"{k} {v}" for k, v in sorted(r["barrier_ops"].items())) or "-"
        cells = [r["file"], f"{r['size_mb']}", str(r["nodes"]), str(r["rescalable"]), str(r["frozen"])] \
            + [str(by.get(c, 0)) for c in CATEGORIES] + [check, f"{r['seconds']}"]
        base = r.get("baseline_seconds")
        cells += [f"{base}" if base else "-", f"{r['seconds'] / base:.2f}" if base else "-", ops]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="folder of .onnx files (with --export: where to write them)")
    ap.add_argument("--export", action="store_true", help="export the networks into FOLDER (needs torch)")
    ap.add_argument("--models", nargs="*", default=None, help="with --export: which networks (default: all)")
    ap.add_argument("--exporters", nargs="*", default=list(EXPORTERS), choices=["legacy", "dynamo_bn", "dynamo"])
    ap.add_argument("--full-below", type=float, default=60.0,
                    help="rescale and check files below this many MB (default 60); larger ones: analysis only")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per file (default 900)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip the baseline run (onnx.load + onnx.save + one onnxruntime inference) of each "
                         "fully rescaled file")
    ap.add_argument("--bn-statistics", action="store_true",
                    help="rescale with bn_statistics=True (a checkout that has the option)")
    args = ap.parse_args(argv)
    options = {"bn_statistics": True} if args.bn_statistics else {}
    folder = Path(args.folder)
    if args.export:
        _export(args.models, folder, args.exporters)
        return 0
    files = sorted(folder.glob("*.onnx"))
    if not files:
        print(f"no .onnx file in {folder}")
        return 1
    rows = []
    for path in files:
        full = path.stat().st_size / 1e6 < args.full_below
        row = _run_child(path, full, args.timeout, options, args.baseline)
        rows.append(row)
        print(f"  {path.name}: " + (row["error"] if "error" in row else
                                      f"{row['rescalable']} rescalable, {row['frozen']} frozen, {row['seconds']} s"
                                      + (f" (baseline {row['baseline_seconds']} s)" if row.get("baseline_seconds")
                                         else "")),
              flush=True)
    tools = sorted({r["tool"] for r in rows if "tool" in r})
    print(f"onnx_pathcond from: {', '.join(tools)}")
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all("error" not in r and r["check"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
