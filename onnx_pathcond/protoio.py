"""ModelProto in and out without extra copies of the weights.

`onnx.save` serializes the whole model into one bytes object (protobuf's own buffer and
Python's copy of it: twice the model in memory) and `onnx.checker` on a ModelProto
serializes it again. Here the checker sees a *skeleton* (every initializer replaced by an
empty tensor of the same name and type: the checker checks the graph, not the values), and
the writer emits the same bytes as `SerializeToString()` one initializer at a time: the
model's fields and the graph's fields are serialized without the initializers, then cut at
the place where the initializers go (protobuf writes fields in field-number order).
"""

from __future__ import annotations

from typing import BinaryIO, Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx

_MODEL_GRAPH_FIELD = 7
_GRAPH_INITIALIZER_FIELD = 5
_TENSOR_RAW_DATA_FIELD = 9


def _copy_except(src, dst, skip) -> None:
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer replaced by an empty tensor of the same name and type."""
    sk = onnx.ModelProto()
    _copy_except(model, sk, {"graph"})
    _copy_except(model.graph, sk.graph, {"initializer"})
    for t in model.graph.initializer:
        stub = sk.graph.initializer.add()
        stub.name = t.name
        stub.data_type = t.data_type
        stub.dims.append(0)
    return sk


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> Tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _split_before(buf: bytes, field: int) -> Tuple[bytes, bytes]:
    """Cut a serialized message where fields numbered `field` or more begin."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if number >= field:
            return buf[:start], buf[start:]
        if wire == 0:
            _, i = _read_varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            length, i = _read_varint(buf, i)
            i += length
        elif wire == 5:
            i += 4
        else:  # groups are not used by onnx
            raise ValueError(f"unexpected wire type {wire}")
    return buf, b""


def _field(number: int, payload_length: int) -> bytes:
    return _varint(number << 3 | 2) + _varint(payload_length)


def tensor_metadata(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of everything in `tensor` but its raw data (which is never read here)."""
    meta = onnx.TensorProto()
    for fd in tensor.DESCRIPTOR.fields:
        if fd.name == "raw_data":
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            values = getattr(tensor, fd.name)
            if len(values):
                getattr(meta, fd.name).extend(values)
        elif tensor.HasField(fd.name):
            if fd.message_type is not None:
                getattr(meta, fd.name).CopyFrom(getattr(tensor, fd.name))
            else:
                setattr(meta, fd.name, getattr(tensor, fd.name))
    return meta


def _raw_bytes(values) -> memoryview:
    array = np.ascontiguousarray(values)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return memoryview(array.reshape(-1).view(np.uint8))


def write_model(model: onnx.ModelProto, f: BinaryIO, replace: Optional[Dict[str, onnx.TensorProto]] = None,
                new_raw: Optional[Dict[str, Callable[[], np.ndarray]]] = None) -> None:
    """Write `model` as `model.SerializeToString()` would, holding one initializer at a time.

    Initializers named in `replace` are written as the given tensor instead (e.g. a stub that
    points to external data). Those named in `new_raw` are written with the raw data of the
    array the function returns (same dtype and element count: computed just before it is
    written, so a rescaled copy of the weights never exists all at once).
    """
    replace = replace or {}
    new_raw = new_raw or {}
    shell = onnx.ModelProto()
    _copy_except(model, shell, {"graph"})
    model_lo, model_hi = _split_before(shell.SerializeToString(), _MODEL_GRAPH_FIELD + 1)
    graph_shell = onnx.GraphProto()
    _copy_except(model.graph, graph_shell, {"initializer"})
    graph_lo, graph_hi = _split_before(graph_shell.SerializeToString(), _GRAPH_INITIALIZER_FIELD + 1)
    sizes: List[int] = []
    for t in model.graph.initializer:
        sizes.append(replace[t.name].ByteSize() if t.name in replace else t.ByteSize())
    inits_length = sum(len(_field(_GRAPH_INITIALIZER_FIELD, n)) + n for n in sizes)
    graph_length = len(graph_lo) + inits_length + len(graph_hi)
    f.write(model_lo)
    if model.HasField("graph"):
        f.write(_field(_MODEL_GRAPH_FIELD, graph_length))
        f.write(graph_lo)
        for t, n in zip(model.graph.initializer, sizes):
            f.write(_field(_GRAPH_INITIALIZER_FIELD, n))
            if t.name in replace:
                f.write(replace[t.name].SerializeToString())
            elif t.name in new_raw:
                _write_with_raw(f, t, new_raw[t.name], n)
            else:
                f.write(t.SerializeToString())
        f.write(graph_hi)
    f.write(model_hi)


def _write_with_raw(f: BinaryIO, tensor: onnx.TensorProto, produce: Callable[[], np.ndarray], size: int) -> None:
    """`tensor` serialized with new raw data: its other fields around a new field 9."""
    lo, hi = _split_before(tensor_metadata(tensor).SerializeToString(), _TENSOR_RAW_DATA_FIELD + 1)
    raw = _raw_bytes(produce())
    head = _field(_TENSOR_RAW_DATA_FIELD, raw.nbytes)
    if len(lo) + len(head) + raw.nbytes + len(hi) != size:
        raise ValueError(f"new values of '{tensor.name}' do not have the size of the old ones")
    f.write(lo)
    f.write(head)
    f.write(raw)
    f.write(hi)


def external_stub(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    """`tensor` without its data, pointing to `length` bytes at `offset` of file `location`."""
    stub = tensor_metadata(tensor)
    del stub.external_data[:]
    stub.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = stub.external_data.add()
        entry.key, entry.value = key, value
    return stub


def raw_bytes_of(tensor: onnx.TensorProto, new_raw: Optional[Dict[str, Callable[[], np.ndarray]]] = None):
    """The raw data to store for `tensor`: its new values if `new_raw` has them, else its own."""
    if new_raw and tensor.name in new_raw:
        return _raw_bytes(new_raw[tensor.name]())
    return tensor.raw_data
