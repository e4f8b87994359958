"""onnx-pathcond: rescale the ReLU networks in ONNX models with the PathCond criterion.

    import onnx_pathcond
    model, report = onnx_pathcond.rescale("in.onnx")
"""

__version__ = "0.1.0"

from .api import analyse_model, external_tensors, load_model, rescale, save_model  # noqa: E402
from .errors import InputError, ModelError, PathCondError, VerificationError  # noqa: E402
from .report import Report  # noqa: E402

__all__ = ["rescale", "load_model", "save_model", "external_tensors", "analyse_model", "Report", "PathCondError", "InputError",
           "ModelError", "VerificationError", "__version__"]
