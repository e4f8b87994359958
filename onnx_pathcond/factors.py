"""The element-wise factors of a rescaling, written for a framework's own optimizer state.

`onnx-pathcond IN OUT --factors F.npz` (or `rescale(..., factors=path)`) writes one array per
rewritten tensor, under its initializer (or Constant) name, in the tensor's stored layout:
its factor new/old in float64, exact (computed from the log-rescalings, not by dividing the
written values), and defined where the old value is zero too. A tensor that also has an offset
(a BatchNorm's running variance under --bn-statistics: new = (old + ε)·f − ε) is listed in the
entry `__offsets__`, a JSON object {name: ε}.

A parameter multiplied by f has its gradient divided by f: a first moment (momentum, Adam's
m) is divided by f, a second moment (Adam's v, RMSprop's and Adagrad's accumulators) by f².

The file is written next to its destination under a temporary name, one tensor at a time (no
second copy of all the factors in memory), and only takes its place with `commit`, once the
run has succeeded: a failed run leaves nothing at the path.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from typing import Iterable

import numpy as np

from .rewrite import TensorRescale

OFFSETS = "__offsets__"


class PendingFactors:
    def __init__(self, path, items: Iterable[TensorRescale]):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        handle, self.temporary = tempfile.mkstemp(prefix=".onnx-pathcond-", suffix=".npz", dir=folder)
        os.close(handle)
        try:
            offsets = {}
            with zipfile.ZipFile(self.temporary, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for item in items:
                    factor = np.ascontiguousarray(np.broadcast_to(item.incoming * item.outgoing,
                                                                  np.broadcast_shapes(item.incoming.shape,
                                                                                      item.outgoing.shape)),
                                                  dtype=np.float64)
                    with archive.open(item.name + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, factor, allow_pickle=False)
                    if item.offset:
                        offsets[item.name] = item.offset
                with archive.open(OFFSETS + ".npy", "w") as member:
                    np.lib.format.write_array(member, np.array(json.dumps(offsets)), allow_pickle=False)
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        os.replace(self.temporary, self.path)
        self.temporary = None

    def discard(self) -> None:
        if self.temporary is not None and os.path.exists(self.temporary):
            os.remove(self.temporary)
        self.temporary = None


def read(path) -> tuple:
    """({name: factor}, {name: offset}) from a file written by `PendingFactors`."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        offsets = json.loads(str(data[OFFSETS]))
        return {name: data[name] for name in data.files if name != OFFSETS}, offsets
