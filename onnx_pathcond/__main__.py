"""`python -m onnx_pathcond IN OUT [options]`: the same command line as `onnx-pathcond`."""

from .cli import main

if __name__ == "__main__":
    main()
