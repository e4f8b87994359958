"""Errors the tool reports to its users.

Every error a user can cause (bad file, bad model, bad option, failed check) is a
`PathCondError` whose message is one line naming the problem. The CLI prints it and
exits with the error's `exit_code`; anything else escaping is a bug.
"""


class PathCondError(Exception):
    """A problem with the user's input or with the result; the message says which."""

    exit_code = 1


class InputError(PathCondError):
    """The input file or the command line is unusable (missing file, not ONNX, bad shape)."""

    exit_code = 2


class ModelError(PathCondError):
    """The model itself cannot be processed (fails the checker, NaN weights, ...)."""

    exit_code = 1


class VerificationError(PathCondError):
    """The rescaled model does not compute the same function as the input."""

    exit_code = 3


class SaveError(PathCondError):
    """The output could not be written (disk full, permissions, ...)."""

    exit_code = 1
