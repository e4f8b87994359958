"""One ONNX model as a run holds it: read from its file, its weights read when needed, and
written out atomically.

A `ModelFile` is the only place that knows how the model is stored: its ModelProto (complete,
or a skeleton whose large weights stay in the input file), which tensors the input kept as
external data (written back the same way), and which files the input is read from (so that
no output replaces one of them). `Graph` reads weight values through it; `write` puts the
model, with any new values, into a temporary folder next to the target, and the returned
`PendingSave` moves it into place or removes it.
"""

from __future__ import annotations

import copy
import errno
import os
import secrets
import shutil
from typing import Callable, Collection, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from . import process, protoio
from .errors import InputError, ModelError, SaveError, option

# Float initializers with more elements than this stay in their file when read lazily.
LEFT_IN_FILE_ABOVE = 4096

PathLike = Union[str, os.PathLike]
# New values of initializers, by name: each function returns the array to store (or an
# iterator of flat blocks of it, in order), computed when the writer reaches that tensor.
NewValues = Dict[str, Callable[[], protoio.NewRaw]]


class ModelFile:
    """A model, where its weights are, and where it came from.

    `proto` is the ModelProto. Read with `lazy=True`, its large float initializers have no
    data in it: `weights` says where in the input's files their bytes are, and
    `initializer_value` reads them, one fresh array per call. `external` names the tensors
    the input stored as external data; `files` lists the files the model is read from (the
    model file, then its external data files; empty for a model made in memory).
    """

    def __init__(self, proto: onnx.ModelProto, *, external: Collection[str] = (), path: Optional[str] = None,
                 files: Sequence[str] = (), weights: Optional[protoio.FileWeights] = None):
        self.proto = proto
        self.external = frozenset(external)
        self.path = path
        self.files: Tuple[str, ...] = tuple(files)
        self.weights = weights if weights is not None else protoio.FileWeights()

    # ------------------------------------------------------------------ reading
    @classmethod
    def read(cls, path: PathLike, lazy: bool = False) -> "ModelFile":
        """Read and check the model in `path`, with one-line errors for the ways that fails.

        External data is read into memory, or with `lazy`, the large float initializers
        (inline or external) keep their values in their files until `initializer_value`.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise InputError(f"input file '{path}' does not exist")
        if os.path.isdir(path):
            raise InputError(f"input '{path}' is a directory, not an ONNX file")
        weights = protoio.FileWeights()
        try:
            if lazy:
                proto, weights = protoio.read_skeleton(path, min_elements=LEFT_IN_FILE_ABOVE)
            else:
                proto = onnx.load(path, load_external_data=False)
        except DecodeError as e:
            raise InputError(f"'{path}' is not an ONNX model (protobuf parse error: {e})") from None
        except Exception as e:  # truncated file, ...
            raise InputError(f"cannot read '{path}' as an ONNX model: {_one_line(e)}") from None
        if not proto.graph.node and not proto.graph.output:
            raise InputError(f"'{path}' is not an ONNX model (it parsed to an empty graph)")
        stored_outside = [t for t in _all_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL]
        files = [path] + sorted({os.path.join(os.path.dirname(path), _location(t)) for t in stored_outside
                                 if _location(t)})
        if stored_outside:
            folder = os.path.dirname(os.path.abspath(path))
            try:
                if lazy:  # initializers stay in their files; Constant-node values are read now
                    protoio.add_external_sources(proto, folder, weights)
                    for tensor in _attribute_tensors(proto):
                        if tensor.data_location == onnx.TensorProto.EXTERNAL:
                            onnx.external_data_helper.load_external_data_for_tensor(tensor, folder)
                            tensor.data_location = onnx.TensorProto.DEFAULT
                            del tensor.external_data[:]
                else:
                    onnx.external_data_helper.load_external_data_for_model(proto, folder)
            except Exception as e:
                raise InputError(f"cannot read the external data of '{path}': {_one_line(e)}") from None
        check_model(proto)
        return cls(proto, external={t.name for t in stored_outside}, path=path, files=files, weights=weights)

    @classmethod
    def copy_of(cls, proto: onnx.ModelProto) -> "ModelFile":
        """A checked copy of a model held in memory (the caller's model is never modified)."""
        check_model(proto)
        return cls(copy.deepcopy(proto))

    def in_file(self, name: str) -> bool:
        """Whether the value of initializer `name` is still in the input's files only."""
        return name in self.weights

    def initializer_value(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The value of one of this model's initializers, read from its file when it is there."""
        if tensor.name in self.weights:
            return self.weights.array(tensor)
        try:
            return numpy_helper.to_array(tensor)
        except ValueError as e:  # raw data that does not fit the shape, ...
            raise ModelError(f"initializer '{tensor.name}' cannot be read: {e}") from None

    def skeleton(self) -> onnx.ModelProto:
        """The model without any initializer data (what verification needs to make inputs)."""
        return protoio.skeleton(self.proto)

    # ------------------------------------------------------------------ writing
    def check_output(self, output: Optional[PathLike], also: Optional[Dict[str, PathLike]] = None) -> None:
        """Refuse an output whose writing would replace a file this model is read from.

        Writing OUT writes OUT, and OUT + ".data" when tensors are kept as external data.
        OUT being the model file itself is `check_output_path`'s case (allowed with
        --overwrite: the input, its data file included, is then replaced as a whole).
        `also` names other files the caller will write ({"report": path}, by option): none of them may
        be a file the model is read from, the model file included."""
        if not self.files:
            return
        writes = []  # (file written, what the message calls it)
        if output is not None and not same_file(os.fspath(output), self.files[0]):
            output = os.fspath(output)
            writes += [(path, f"'{output}'") for path in [output] + ([output + ".data"] if self.external else [])]
        writes += [(os.fspath(path), f"{option(name)} '{os.fspath(path)}'") for name, path in (also or {}).items()]
        for target, named in writes:
            for source in self.files:
                if same_file(target, source):
                    what = ("input model" if source == self.files[0]
                            else f"external data of the input '{self.files[0]}'")
                    raise InputError(f"writing {named} would overwrite '{source}', the {what}; "
                                     f"choose another path")

    def write(self, path: PathLike, new_values: Optional[NewValues] = None) -> "PendingSave":
        """Write the model into a temporary folder next to `path` (not yet in place).

        Initializers named in `new_values` are written with the values their function
        returns, called when the writer reaches them; the others as they are, those left in
        the input's files copied from there a piece at a time."""
        return PendingSave(self, path, new_values)


class PendingSave:
    """A model written into a temporary folder next to its target, not yet in place.

    `commit()` moves it into place (the data file before the model that points to it);
    `discard()`, or leaving the `with` block without committing, removes it. Tensors the
    model file names in `external` go to one data file, `<target>.data`. A failure leaves
    nothing at the target and never touches the input.
    """

    def __init__(self, model: ModelFile, path: PathLike, new_values: Optional[NewValues] = None):
        self.path = os.fspath(path)
        self.folder = os.path.dirname(os.path.abspath(self.path))
        self.name = os.path.basename(self.path)
        self.data_name = self.name + ".data"
        proto, external, weights = model.proto, model.external, model.weights
        new_values = dict(new_values or {})
        try:
            self.work = _new_work_folder(self.folder, self.name)
        except OSError as e:
            raise SaveError(f"cannot write '{self.path}': {e.strerror or _one_line(e)}") from None
        stubs: Dict[str, onnx.TensorProto] = {}
        restore = []
        try:  # from the folder's creation on, any way out but success removes it (a signal too)
            initializers = [t for t in proto.graph.initializer
                            if t.name in external and (t.HasField("raw_data") or t.name in weights)]
            attributes = [t for t in _attribute_tensors(proto) if t.name in external and t.HasField("raw_data")]
            self.has_data = bool(initializers or attributes)
            try:
                if self.has_data:
                    with open(os.path.join(self.work, self.data_name), "wb") as data:
                        for tensor, in_node in [(t, False) for t in initializers] + [(t, True) for t in attributes]:
                            offset = data.tell()
                            protoio.write_raw(data, tensor, new_values, weights)
                            new_values.pop(tensor.name, None)
                            stub = protoio.external_stub(tensor, self.data_name, offset, data.tell() - offset)
                            if in_node:  # inside the graph's nodes: swapped in place, restored below
                                restore.append((tensor, tensor.raw_data))
                                tensor.CopyFrom(stub)
                            else:
                                stubs[tensor.name] = stub
                with open(self.model_path, "wb") as f:
                    protoio.write_model(proto, f, replace=stubs, new_raw=new_values, weights=weights)
            finally:  # give the caller its Constant-node values back, inline
                for tensor, raw in restore:
                    tensor.raw_data = raw
                    tensor.data_location = onnx.TensorProto.DEFAULT
                    del tensor.external_data[:]
        except OSError as e:
            self.discard()
            raise SaveError(f"cannot write '{self.path}': {e.strerror or _one_line(e)}") from None
        except BaseException:
            self.discard()
            raise

    @property
    def model_path(self) -> str:
        """Where the written model is until `commit`."""
        return os.path.join(self.work, self.name)

    def commit(self) -> None:
        try:
            mode = _new_file_mode(self.path)
            if self.has_data:
                os.chmod(os.path.join(self.work, self.data_name), mode)
                os.replace(os.path.join(self.work, self.data_name), os.path.join(self.folder, self.data_name))
            os.chmod(self.model_path, mode)
            os.replace(self.model_path, self.path)
        except OSError as e:
            raise SaveError(f"cannot write '{self.path}': {e.strerror or _one_line(e)}") from None
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        UNFINISHED.discard(self.work)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()
        return False


# Temporary folders of writes not yet committed or discarded. A folder is listed before it
# is created: a stop signal can land between any two lines (even inside mkdtemp), and the
# `finally` that would remove the folder may not have been entered yet; the command line
# then removes what is listed here (`discard_unfinished`).
UNFINISHED: set = set()


def _new_work_folder(folder: str, name: str) -> str:
    for _ in range(100):
        work = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        UNFINISHED.add(work)
        try:
            os.mkdir(work, 0o700)
            return work
        except FileExistsError:
            UNFINISHED.discard(work)
        # any other way out (an OSError, a signal after mkdir) leaves `work` listed: removing
        # a folder that was never made costs nothing
    raise FileExistsError(errno.EEXIST, "no free name for a temporary folder", folder)


def discard_unfinished() -> None:
    """Remove the temporary folders of every write still pending (after an interruption)."""
    for work in list(UNFINISHED):
        shutil.rmtree(work, ignore_errors=True)
        UNFINISHED.discard(work)


process.on_stop(discard_unfinished)  # the command line runs it when a run ends, stopped or not


# ---------------------------------------------------------------------------- checks
def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker with a one-line error, run on the weight-free skeleton of the model."""
    try:
        onnx.checker.check_model(protoio.skeleton(model))
    except onnx.checker.ValidationError as e:
        raise ModelError(f"the model fails onnx.checker: {_one_line(e) or 'invalid model'}") from None
    except ValueError as e:  # > 2 GB protobuf: cannot be checked in memory
        if "2GiB" not in str(e) and "2GB" not in str(e):
            raise ModelError(f"the model fails onnx.checker: {_one_line(e)}") from None


def check_output_path(output: PathLike, input_path: Optional[str], overwrite: bool) -> str:
    """Refuse an output we could not or should not write, before reading the input."""
    output = os.fspath(output)
    if not output:  # abspath('') is the current folder: it would be written as its parent's entry
        raise InputError("the output path is empty")
    if output.endswith(("/", os.sep)) or os.path.basename(output) in (".", ".."):
        raise InputError(f"output '{output}' names a directory, not a file")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise InputError(f"output directory '{os.path.dirname(output) or '.'}' does not exist")
    if os.path.isdir(output):
        raise InputError(f"output '{output}' is a directory")
    if input_path is not None and same_file(output, input_path) and not overwrite:
        raise InputError(f"output '{output}' is the input file; pass {option('overwrite', True)} to replace it")
    return output


def check_other_writes(output: Optional[PathLike], also: Optional[Dict[str, PathLike]]) -> None:
    """Refuse files the caller will write beside OUT ({"report": path, "factors": path}, by the
    option that names each) that are not file paths in an existing folder, or that are OUT, its
    data file or each other. (`ModelFile.check_output` refuses those that are files the input
    is read from.)"""
    named = [(option(name), os.fspath(path)) for name, path in (also or {}).items() if path is not None]
    targets = [] if output is None else [("the output model", os.fspath(output)),
                                         ("the output model's data file", os.fspath(output) + ".data")]
    for mention, path in named:
        if not path or os.path.isdir(path):
            raise InputError(f"{mention} '{path}' is not a file path")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise InputError(f"{mention} folder '{os.path.dirname(path)}' does not exist")
        for what, other in targets:
            if same_file(path, other):
                raise InputError(f"{mention} '{path}' is {what}; choose another path")
        targets.append((f"the file of {mention}", path))


# ---------------------------------------------------------------------------- helpers
def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    yield from _attribute_tensors(model)


def _attribute_tensors(model: onnx.ModelProto):
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def _location(tensor: onnx.TensorProto) -> str:
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), "")


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: the same inode where both exist (links, other
    spellings), the same absolute path where one does not exist yet."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.abspath(a) == os.path.abspath(b)


def _new_file_mode(path: str) -> int:
    """The mode a plain new file would get, or the mode of the file being replaced."""
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _one_line(error: Exception, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."
