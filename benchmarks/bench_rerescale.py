"""What a rescale costs during training: a fresh `rescale_module` against a `PathConditioner`
re-rescale, which exports and analyses once and then only computes statistics, solves and
writes back.

    python benchmarks/bench_rerescale.py                    # ResNet-50 at 224² and the 500×8 MLP
    python benchmarks/bench_rerescale.py --nets mlp_k8 --repeat 5

For each net (benchmarks/make_models.py's architectures and weights) it times, best of
`--repeat` runs, one thread count for all (`--threads`, default the machine's):

* `fresh`: `onnx_pathcond.torch.rescale_module(module, x)`: export, analysis, statistics,
  solve, rewrite, onnxruntime check of the written file, load back, PyTorch check;
* `setup`: `PathConditioner(module, x)`: the export and analysis paid once;
* `re-rescale`: `cond.rescale()` with its PyTorch check (4 forwards of the example input);
* `re-rescale, no check`: `PathConditioner(..., check=False).rescale()`;
* `one sweep`: `cond.rescale(max_iter=1)` without the check (the authors' schedule step);
* `train step`: one SGD step (forward, backward, update) at `--batch` samples, for scale:
  `share` is the re-rescale's cost in such steps. For the MLP, `epoch` is one epoch of the
  training benchmark's digits protocol (1437 samples, minibatch 128) on a 64-input copy.

It prints a Markdown table. Timings on a shared machine move with its load: compare rows of one
run only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def _best(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(name: str, repeat: int, batch: int) -> dict:
    import torch

    import make_models
    import onnx_pathcond.torch as pt

    module, shape = {"resnet50": make_models.resnet50, "mlp_k8": lambda: make_models.mlp(8)}[name]()
    make_models.initialise(module)
    x = torch.randn(shape)
    row = {"net": name, "parameters": sum(p.numel() for p in module.parameters())}
    row["fresh"] = _best(lambda: pt.rescale_module(module, x), repeat)
    t0 = time.perf_counter()
    cond = pt.PathConditioner(module, x)
    row["setup"] = time.perf_counter() - t0
    row["re-rescale"] = _best(lambda: cond.rescale(), repeat)
    quiet = pt.PathConditioner(module, x, check=False)
    row["re-rescale, no check"] = _best(lambda: quiet.rescale(), repeat)
    row["one sweep"] = _best(lambda: quiet.rescale(max_iter=1), repeat)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
    xb = torch.randn((batch,) + tuple(shape[1:]))
    yb = torch.randint(0, 10, (batch,))

    def step():
        module.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(xb), yb).backward()
        optimizer.step()

    row["train step"] = _best(step, repeat)
    if name == "mlp_k8":  # one epoch of the digits protocol on the same widths (64 inputs)
        layers = [torch.nn.Linear(64, 500), torch.nn.ReLU()]
        for _ in range(7):
            layers += [torch.nn.Linear(500, 500), torch.nn.ReLU()]
        digits = torch.nn.Sequential(*layers, torch.nn.Linear(500, 10))
        opt = torch.optim.SGD(digits.parameters(), lr=0.1)
        xs, ys = torch.randn(1437, 64), torch.randint(0, 10, (1437,))

        def epoch():
            for s in range(0, 1437, 128):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(digits(xs[s:s + 128]), ys[s:s + 128]).backward()
                opt.step()

        row["epoch"] = _best(epoch, repeat)
        dcond = pt.PathConditioner(digits, xs[:32], opt)
        row["digits re-rescale"] = _best(lambda: dcond.rescale(), repeat)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", default=["resnet50", "mlp_k8"], choices=["resnet50", "mlp_k8"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="samples of the reference training step (default 32)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = [measure(n, args.repeat, args.batch) for n in args.nets]
    print(f"| net | parameters | fresh rescale_module (s) | setup (s) | re-rescale (s) | re-rescale / fresh | "
          f"no check (s) | one sweep (s) | train step at {args.batch} (s) | re-rescale in steps |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['net']} | {r['parameters']:,} | {r['fresh']:.2f} | {r['setup']:.2f} | {r['re-rescale']:.2f} | "
              f"{r['re-rescale'] / r['fresh']:.2f} | {r['re-rescale, no check']:.2f} | {r['one sweep']:.2f} | "
              f"{r['train step']:.3f} | {r['re-rescale'] / r['train step']:.1f} |")
    for r in rows:
        if "epoch" in r:
            print(f"\n{r['net']} on the digits protocol (64 inputs): one epoch {r['epoch']:.3f} s, a re-rescale with "
                  f"its check {r['digits re-rescale']:.3f} s = {r['digits re-rescale'] / r['epoch']:.2f} epoch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
