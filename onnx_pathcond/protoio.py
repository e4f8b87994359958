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

import os
from dataclasses import dataclass
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ModelError

# Element types of floating-point tensors: the weights that may stay in their file.
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)

# New raw data of a tensor: an array, or an iterator of flat blocks of it in order.
NewRaw = Union[np.ndarray, Iterator[np.ndarray]]

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


def _fields(buf, start: int, end: int):
    """(number, wire type, field start, value start, value end) of each field in buf[start:end];
    for a length-delimited field the value is its payload."""
    i = start
    while i < end:
        field_start = i
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value_start = i
            _, i = _read_varint(buf, i)
        elif wire == 1:
            value_start, i = i, i + 8
        elif wire == 2:
            length, value_start = _read_varint(buf, i)
            i = value_start + length
        elif wire == 5:
            value_start, i = i, i + 4
        else:
            raise ValueError(f"unexpected wire type {wire}")
        if i > end:
            raise ValueError("truncated message")
        yield number, wire, field_start, value_start, i


def _split_before(buf: bytes, field: int) -> Tuple[bytes, bytes]:
    """Cut a serialized message where fields numbered `field` or more begin."""
    for number, _, start, _, _ in _fields(buf, 0, len(buf)):
        if number >= field:
            return buf[:start], buf[start:]
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
                new_raw: Optional[Dict[str, Callable[[], NewRaw]]] = None,
                weights: Optional["FileWeights"] = None) -> None:
    """Write `model` as `model.SerializeToString()` would, holding one initializer at a time.

    Initializers named in `replace` are written as the given tensor instead (e.g. a stub that
    points to external data). Those named in `new_raw` are written with the raw data of the
    array the function returns, or of the blocks of the iterator it returns (same dtype and
    element count: computed as it is written, so a rescaled copy of the weights never exists
    all at once). Those whose bytes
    `weights` keeps in the input file are copied from there, a piece at a time.
    """
    replace = replace or {}
    new_raw = new_raw or {}
    in_file = weights.message if weights is not None else {}
    shell = onnx.ModelProto()
    _copy_except(model, shell, {"graph"})
    model_lo, model_hi = _split_before(shell.SerializeToString(), _MODEL_GRAPH_FIELD + 1)
    graph_shell = onnx.GraphProto()
    _copy_except(model.graph, graph_shell, {"initializer"})
    graph_lo, graph_hi = _split_before(graph_shell.SerializeToString(), _GRAPH_INITIALIZER_FIELD + 1)
    sizes: List[int] = []
    raw_lengths: Dict[str, int] = {}
    for t in model.graph.initializer:
        if t.name in new_raw and t.name not in replace:
            raw_lengths[t.name] = weights.raw[t.name].length if t.name in in_file else len(t.raw_data)
        if t.name in replace:
            sizes.append(replace[t.name].ByteSize())
        elif t.name in in_file and t.name in new_raw:
            raw_length = weights.raw[t.name].length
            sizes.append(tensor_metadata(t).ByteSize() + len(_field(_TENSOR_RAW_DATA_FIELD, raw_length)) + raw_length)
        elif t.name in in_file:
            sizes.append(in_file[t.name].length)
        else:
            sizes.append(t.ByteSize())
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
                _write_with_raw(f, t, new_raw[t.name], n, raw_lengths[t.name])
            elif t.name in in_file:
                weights.copy_message(t.name, f)
            else:
                f.write(t.SerializeToString())
        f.write(graph_hi)
    f.write(model_hi)


def _write_with_raw(f: BinaryIO, tensor: onnx.TensorProto, produce: Callable[[], NewRaw], size: int,
                    raw_length: int) -> None:
    """`tensor` serialized with new raw data (`raw_length` bytes, as the old): its other
    fields around a new field 9."""
    lo, hi = _split_before(tensor_metadata(tensor).SerializeToString(), _TENSOR_RAW_DATA_FIELD + 1)
    head = _field(_TENSOR_RAW_DATA_FIELD, raw_length)
    if len(lo) + len(head) + raw_length + len(hi) != size:
        raise ValueError(f"new values of '{tensor.name}' do not have the size of the old ones")
    f.write(lo)
    f.write(head)
    if _write_blocks(f, produce()) != raw_length:
        raise ValueError(f"new values of '{tensor.name}' do not have the size of the old ones")
    f.write(hi)


def _write_blocks(out: BinaryIO, values: NewRaw) -> int:
    """Write new values (an array, or an iterator of flat blocks in order) as raw data;
    returns the bytes written."""
    written = 0
    for block in ([values] if isinstance(values, np.ndarray) else values):
        raw = _raw_bytes(block)
        out.write(raw)
        written += raw.nbytes
    return written


def external_stub(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    """`tensor` without its data, pointing to `length` bytes at `offset` of file `location`."""
    stub = tensor_metadata(tensor)
    del stub.external_data[:]
    stub.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = stub.external_data.add()
        entry.key, entry.value = key, value
    return stub


def write_raw(out: BinaryIO, tensor: onnx.TensorProto, new_raw: Optional[Dict[str, Callable[[], NewRaw]]] = None,
              weights: Optional["FileWeights"] = None) -> None:
    """Write the raw data to store for `tensor`: its new values if `new_raw` has them, else its
    own (from its file when `weights` keeps it there)."""
    if new_raw and tensor.name in new_raw:
        _write_blocks(out, new_raw[tensor.name]())
    elif weights is not None and tensor.name in weights:
        weights.copy_raw(tensor.name, out)
    else:
        out.write(tensor.raw_data)


# ---------------------------------------------------------------------------- weights left in the file
# Element types whose raw data numpy reads as is (little-endian, as ONNX stores it).
_PLAIN_DTYPES = {onnx.TensorProto.FLOAT: "<f4", onnx.TensorProto.DOUBLE: "<f8", onnx.TensorProto.FLOAT16: "<f2"}
_COPY_CHUNK = 1 << 24


@dataclass(frozen=True)
class StoredBytes:
    """`length` bytes at `offset` of the file at `path`."""

    path: str
    offset: int
    length: int


class FileWeights:
    """Initializers whose values stay in their files, read when they are needed.

    A model read by `read_skeleton` holds its large float initializers without their raw
    data: `raw[name]` says where those bytes are (in the model file itself, or in an
    external data file), and `message[name]`, for those stored inside the model file, where
    the whole serialized TensorProto is (written out verbatim when it is left unchanged).
    Each read maps the tensor's bytes from its file as a read-only array, unmapped when the
    caller drops it: the process never holds all the weights at once, and reading a weight
    again costs no copy.
    """

    def __init__(self) -> None:
        self.raw: Dict[str, StoredBytes] = {}
        self.message: Dict[str, StoredBytes] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.raw

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        source = self.raw[tensor.name]
        shape = tuple(tensor.dims)
        count = int(np.prod(shape)) if shape else 1
        plain = _PLAIN_DTYPES.get(tensor.data_type)
        if plain is not None:
            if source.length != count * np.dtype(plain).itemsize:
                raise ModelError(f"initializer '{tensor.name}' holds {source.length} bytes where its shape "
                                 f"{list(shape)} needs {count * np.dtype(plain).itemsize}")
            return _mapped(tensor.name, source, plain, count).reshape(shape)
        full = tensor_metadata(tensor)  # other types (bfloat16): onnx's own conversion
        del full.external_data[:]
        full.data_location = onnx.TensorProto.DEFAULT
        full.raw_data = self.read(tensor.name)
        return numpy_helper.to_array(full)

    def read(self, name: str) -> bytes:
        """The raw data of `name`."""
        return self._read(name, self.raw[name])

    def read_message(self, name: str) -> bytes:
        """The serialized TensorProto of `name` as the model file holds it."""
        return self._read(name, self.message[name])

    @staticmethod
    def _read(name: str, source: StoredBytes) -> bytes:
        with open(source.path, "rb") as f:
            f.seek(source.offset)
            data = f.read(source.length)
        if len(data) != source.length:
            raise ModelError(f"initializer '{name}' is cut short in '{source.path}'")
        return data

    @staticmethod
    def _copy(source: StoredBytes, out: BinaryIO) -> None:
        with open(source.path, "rb") as f:
            f.seek(source.offset)
            left = source.length
            while left:
                chunk = f.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise ModelError(f"'{source.path}' is shorter than its model says")
                out.write(chunk)
                left -= len(chunk)

    def copy_raw(self, name: str, out: BinaryIO) -> None:
        self._copy(self.raw[name], out)

    def copy_message(self, name: str, out: BinaryIO) -> None:
        self._copy(self.message[name], out)


def _mapped(name: str, source: StoredBytes, dtype: str, count: int) -> np.ndarray:
    """The `count` values at `source`, read-only, mapped from the file rather than copied:
    the pages come from the page cache as they are read, and go with the array (its base
    holds the map). A copy would cost a fresh allocation as large as the tensor at every
    read, and several steps read each weight."""
    import mmap

    if count == 0:
        return np.empty(0, dtype=dtype)
    with open(source.path, "rb") as f:
        if os.fstat(f.fileno()).st_size < source.offset + source.length:
            raise ModelError(f"initializer '{name}' is cut short in '{source.path}'")
        start = source.offset - source.offset % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(f.fileno(), source.offset + source.length - start, offset=start, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=source.offset - start)


def _lazy_tensor(buf, start: int, end: int, min_elements: int):
    """For a TensorProto in buf[start:end] stored inline as raw data of a float type with more
    than `min_elements` elements: (name, its bytes without the raw data field, raw data
    start, raw data end); else None."""
    name, data_type, raw, kept, elements = "", 0, None, [], 1
    for number, wire, field_start, value_start, value_end in _fields(buf, start, end):
        if number == 9 and wire == 2:
            raw = (value_start, value_end)
            continue
        kept.append((field_start, value_end))
        if number == 8 and wire == 2:
            name = bytes(buf[value_start:value_end]).decode("utf-8")
        elif number == 2 and wire == 0:
            data_type = _read_varint(buf, value_start)[0]
        elif number == 1 and wire == 0:
            elements *= _read_varint(buf, value_start)[0]
        elif number == 1 and wire == 2:  # packed dims
            i = value_start
            while i < value_end:
                dim, i = _read_varint(buf, i)
                elements *= dim
    if raw is None or data_type not in FLOAT_TYPES or elements <= min_elements or not name:
        return None
    return name, b"".join(bytes(buf[a:b]) for a, b in kept), raw[0], raw[1]


def read_skeleton(path: str, min_elements: int) -> Tuple[onnx.ModelProto, FileWeights]:
    """The model in `path` with the raw data of its large float initializers left in the file.

    Those initializers keep every other field (name, type, dims, ...); `FileWeights` says
    where their bytes are. Smaller or other tensors are read as usual. The file is walked
    field by field through a memory map, without reading the weights themselves.
    """
    import mmap

    from google.protobuf.message import DecodeError

    weights = FileWeights()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return onnx.ModelProto(), weights
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                skeleton = _strip_weights(buf, size, path, min_elements, weights)
            except (ValueError, IndexError, UnicodeDecodeError) as e:  # not protobuf wire format
                raise DecodeError(f"{e}") from None
    return onnx.ModelProto.FromString(skeleton), weights


def _strip_weights(buf, size: int, path: str, min_elements: int, weights: FileWeights) -> bytes:
    """The serialized model in buf without the raw data of its large float initializers."""
    model_parts: List[bytes] = []
    for number, wire, field_start, value_start, value_end in _fields(buf, 0, size):
        if number != _MODEL_GRAPH_FIELD or wire != 2:
            model_parts.append(bytes(buf[field_start:value_end]))
            continue
        graph_parts: List[bytes] = []
        for g_number, g_wire, g_start, g_value, g_end in _fields(buf, value_start, value_end):
            lazy = None
            if g_number == _GRAPH_INITIALIZER_FIELD and g_wire == 2:
                lazy = _lazy_tensor(buf, g_value, g_end, min_elements)
            if lazy is None:
                graph_parts.append(bytes(buf[g_start:g_end]))
                continue
            name, stripped, raw_start, raw_end = lazy
            graph_parts.append(_field(_GRAPH_INITIALIZER_FIELD, len(stripped)) + stripped)
            weights.raw[name] = StoredBytes(path, raw_start, raw_end - raw_start)
            weights.message[name] = StoredBytes(path, g_value, g_end - g_value)
        graph = b"".join(graph_parts)
        model_parts.append(_field(_MODEL_GRAPH_FIELD, len(graph)) + graph)
    return b"".join(model_parts)


def add_external_sources(model: onnx.ModelProto, folder: str, weights: FileWeights) -> None:
    """Record where the external data of each initializer is, without reading it."""
    root = os.path.realpath(folder)
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = os.path.realpath(os.path.join(root, location))
        if not location or os.path.isabs(location) or os.path.commonpath([root, target]) != root:
            raise ValueError(f"tensor '{tensor.name}' points outside the model's folder ('{location}')")
        if not os.path.isfile(target):
            raise ValueError(f"external data file '{location}' of tensor '{tensor.name}' does not exist")
        offset = int(info.get("offset", 0))
        available = os.path.getsize(target) - offset
        length = int(info["length"]) if "length" in info else available
        if offset < 0 or length > available:
            raise ValueError(f"tensor '{tensor.name}' reaches past the end of '{location}'")
        weights.raw[tensor.name] = StoredBytes(target, offset, length)
