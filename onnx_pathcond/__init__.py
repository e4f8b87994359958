"""onnx-pathcond: rescale the ReLU networks in ONNX models with the PathCond criterion.

    import onnx_pathcond
    model, report = onnx_pathcond.rescale("in.onnx")
"""

__version__ = "0.1.0"

# The public names are imported on first use (PEP 562): importing the package itself, as
# the command line does before anything else, stays cheap, so that the command can take
# charge of Ctrl-C before onnx and onnxruntime (about a second) are loaded.
_EXPORTS = {
    "rescale": "api", "rescale_file": "api", "load_model": "api", "save_model": "api", "external_tensors": "api", "analyse_model": "api",
    "Report": "report", "RescaleOptions": "config", "SolveOptions": "config",
    "PathCondError": "errors", "InputError": "errors", "ModelError": "errors", "VerificationError": "errors",
}

__all__ = ["rescale", "rescale_file", "load_model", "save_model", "external_tensors", "analyse_model", "Report",
           "RescaleOptions", "SolveOptions", "PathCondError", "InputError", "ModelError", "VerificationError",
           "__version__"]


def __getattr__(name):
    if name == "torch":  # the optional PyTorch submodule: torch is imported only when it is asked for
        import importlib

        return importlib.import_module(".torch", __name__)
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
