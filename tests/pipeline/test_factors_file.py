"""`--factors F.npz`: the element-wise factor new/old of every rewritten tensor, for carrying an
optimizer's state in any framework. Checked against the written model (new = old·f up to the
cast), for a running variance's offset, for what a failed run leaves (nothing), and end to
end: an Adam state carried with the file in numpy equals the gradients of the rescaled
module, loaded back by name."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_pathcond import factors as factor_file

from support.repo import ROOT  # noqa: E402  (the repository, whatever the working directory)


def _arrays(path):
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("name, options", [("resnet.dynamo_fused.onnx", ()),
                                           ("densenet.dynamo_bn.onnx", ("--bn-statistics",)),
                                           ("mlp.onnx", ("--solver", "exact"))])
def test_the_factors_are_new_over_old(name, options, tmp_path, run_cli):
    src = os.path.join(ROOT, "models", name)
    out, npz = tmp_path / "out.onnx", tmp_path / "f.npz"
    proc = run_cli(src, out, "--factors", npz, "--report", tmp_path / "r.json", *options)
    assert proc.returncode == 0, proc.stderr
    found, offsets = factor_file.read(npz)
    old, new = _arrays(src), _arrays(out)
    changed = {n for n in old if not np.array_equal(old[n], new[n])}
    assert changed and changed <= set(found)  # every tensor that moved has its factor
    for tensor, factor in found.items():
        assert factor.dtype == np.float64 and factor.shape == old[tensor].shape
        assert np.all(np.isfinite(factor)) and np.all(factor > 0)
        offset = offsets.get(tensor, 0.0)
        expected = (old[tensor] + offset) * factor - offset
        np.testing.assert_allclose(new[tensor], expected, rtol=2e-7, atol=1e-6 * np.abs(expected).max(), err_msg=tensor)
    assert bool(offsets) == ("--bn-statistics" in options)
    assert all(t.endswith("running_var") for t in offsets)


def test_a_failed_run_writes_no_factors_and_bad_paths_are_refused(tmp_path, run_cli):
    src = tmp_path / "in.onnx"
    src.write_bytes(open(os.path.join(ROOT, "models", "mlp.onnx"), "rb").read())
    before = src.read_bytes()
    out, npz = tmp_path / "out.onnx", tmp_path / "f.npz"
    proc = run_cli(src, out, "--factors", npz, "--rtol", "0")  # float32 rounding fails the check
    assert proc.returncode == 3 and not npz.exists() and not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".onnx-pathcond")]
    for bad, word in ((src, "input model"), (out, "output model"), (tmp_path / "missing" / "f.npz", "does not exist")):
        proc = run_cli(src, out, "--factors", bad)
        assert proc.returncode == 2 and word in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert src.read_bytes() == before and not out.exists()


def test_an_adam_state_carried_with_the_file_matches_the_rescaled_gradients(tmp_path, run_cli):
    torch = pytest.importorskip("torch")
    zoo = pytest.importorskip("models.zoo")
    pt = pytest.importorskip("onnx_pathcond.torch")
    module, shape = zoo.build("resnet")
    g = torch.Generator().manual_seed(0)
    x = torch.randn((8,) + tuple(shape[1:]), generator=g)

    def gradients(m):
        m.train()
        m.zero_grad(set_to_none=True)
        (m(x) ** 2).mean().backward()
        return {n: p.grad.detach().double().numpy() for n, p in m.named_parameters()}

    before = gradients(module)
    # a framework's own Adam state at this point: m = gradient, v = its square (numpy here)
    state = {n: {"m": g_, "v": g_ ** 2} for n, g_ in before.items()}
    pt.export_module(module, x[:1], tmp_path / "in.onnx")
    proc = run_cli(tmp_path / "in.onnx", tmp_path / "out.onnx", "--factors", tmp_path / "f.npz")
    assert proc.returncode == 0, proc.stderr
    pt.load_rescaled(module, tmp_path / "out.onnx")
    found, _ = factor_file.read(tmp_path / "f.npz")
    for n, s in state.items():  # the README's rule
        f = found.get(n, 1.0)
        s["m"], s["v"] = s["m"] / f, s["v"] / f ** 2
    after = gradients(module)
    scale = max(np.abs(a).max() for a in after.values())
    assert any(n in found for n in state)
    for n, s in state.items():
        assert np.abs(s["m"] - after[n]).max() <= 1e-4 * scale, n
        assert np.abs(s["v"] - after[n] ** 2).max() <= 1e-4 * scale ** 2, n


def test_the_report_and_the_factors_are_two_files(tmp_path, run_cli):
    src = os.path.join(ROOT, "models", "mlp.onnx")
    same = tmp_path / "both"
    proc = run_cli(src, tmp_path / "out.onnx", "--report", same, "--factors", same)
    assert proc.returncode == 2 and "--factors" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not same.exists() and not (tmp_path / "out.onnx").exists()
