"""Errors the tool reports to its users.

Every error a user can cause (bad file, bad model, bad option, failed check) is a
`PathCondError` whose message is one line naming the problem. The CLI prints it and
exits with the error's `exit_code`; anything else escaping is a bug.

A message that names an option of the run names it with `option(...)`: the library never
speaks in command-line flags. `str(error)` spells it as the Python API's keyword
(`device='cuda'`), and the command line spells it as its flag (`--device cuda`) through
`error.spelled(...)`.
"""

from typing import Callable, Optional

# Brackets an option's mention inside a message (an invisible separator: no file or tensor
# name the message quotes would hold one); `spelled` replaces each mention.
_MARK = "\u2063"
_VALUE = "\u2064"
_ABSENT = object()


def option(name: str, value=_ABSENT) -> str:
    """A mention of the option `name` (the Python API's keyword), with a value or without."""
    return f"{_MARK}{name}{_MARK}" if value is _ABSENT else f"{_MARK}{name}{_VALUE}{value!r}{_MARK}"


def keyword(name: str, value: Optional[str]) -> str:
    """How the Python API spells a mention: `name`, or `name=value`."""
    return name if value is None else f"{name}={value}"


def spell(message: str, spelling: Callable[[str, Optional[str]], str] = keyword) -> str:
    """`message` with each option mention spelled by `spelling(name, repr of value or None)`."""
    parts = message.split(_MARK)
    for i in range(1, len(parts), 2):
        name, _, value = parts[i].partition(_VALUE)
        parts[i] = spelling(name, value if _VALUE in parts[i] else None)
    return "".join(parts)


class PathCondError(Exception):
    """A problem with the user's input or with the result; the message says which."""

    exit_code = 1

    def __str__(self) -> str:
        return self.spelled()

    def spelled(self, spelling: Callable[[str, Optional[str]], str] = keyword) -> str:
        """The message with its options spelled by `spelling` (default: as keywords)."""
        return spell(super().__str__(), spelling)


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
