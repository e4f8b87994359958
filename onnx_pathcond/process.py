"""Process control for the command line: stop signals, exit codes, one-line errors.

A stop signal (Ctrl-C, SIGTERM, SIGHUP) raises `Interrupted` in the main thread, which unwinds
like KeyboardInterrupt so that every `finally` runs; `OneLineErrors` turns it into one
`error: interrupted (SIG...)` line and exit code 128 + its number, after running the cleanups
registered with `on_stop` (the temporary folders of a save a signal cut short). It also turns
click's usage errors into one `error: ...` line. Nothing heavy is imported here.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, List

import click


def exit_interrupted(signum: int, after: str = "") -> None:
    """One line and the shell's exit code for a signal: 128 + its number (130 for Ctrl-C)."""
    sys.stderr.write(f"error: interrupted ({signal.Signals(signum).name}){after}\n")
    sys.stderr.flush()
    sys.exit(128 + signum)


_CLEANUPS: List[Callable[[], None]] = []


def on_stop(cleanup: Callable[[], None]) -> None:
    """Run `cleanup` whenever a command of `OneLineErrors` ends (it must be idempotent: it
    runs after every run, interrupted or not)."""
    if cleanup not in _CLEANUPS:
        _CLEANUPS.append(cleanup)


class Interrupted(BaseException):
    """A signal asking the run to stop. Raised in the main thread by our handler, it unwinds
    like KeyboardInterrupt, so every `finally` runs and the temporary folder next to OUT is
    removed; unlike KeyboardInterrupt, click does not turn it into its own "Aborted!"."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# SIGTERM (kill, a job scheduler) and SIGHUP (the terminal closed) would otherwise end the
# process on the spot and leave the temporary folder behind; they take Ctrl-C's way out.
STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


class SignalsStop:
    """While in the block, the stop signals raise `Interrupted` in the main thread; the
    previous handlers are put back on leaving. A signal that was ignored when we started
    (nohup, a background job) stays ignored. A second signal while the first one's cleanup
    runs is ignored, so that the cleanup itself is not cut short.

    Inside `deferred()` a signal is only noted, and raised when the block ends: an exception
    raised while an extension module initialises can crash the interpreter (seen: onnx's
    protobuf module, a segmentation fault), and one raised inside an import lock's callback is
    swallowed ("Exception ignored"), so the run would go on as if Ctrl-C had not been pressed."""

    active: "SignalsStop | None" = None  # the instance whose handlers are installed

    def __enter__(self):
        self.previous = {}
        self.stopping = False
        self.deferring = False
        self.pending = None
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers (the command run from a thread)
        for signum in STOP_SIGNALS:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue
            self.previous[signum] = previous
            signal.signal(signum, self._handle)
        SignalsStop.active = self
        return self

    def _handle(self, signum, frame):
        if self.stopping or self.pending is not None:
            return
        self.pending = signum
        if self.deferring:
            return
        self.stopping = True
        raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            self.stopping = True
            raise Interrupted(self.pending)

    def __exit__(self, *exc):
        SignalsStop.active = None
        for signum, previous in self.previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        return False


def held_signals():
    """A block in which a stop signal is only noted, and raised when it ends (see
    `SignalsStop.deferred`): for importing the extension modules."""
    stop = SignalsStop.active
    return stop.deferred() if stop is not None else contextlib.nullcontext()


class OneLineErrors(click.Command):
    """click's usage errors, like ours, as one `error: ...` line (exit code 2); a stop
    signal as one `error: interrupted (SIG...)` line and exit code 128 + its number, saying
    whether the output was already in place (`written`, set by the command's callback)."""

    written: List[str] = []

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        self.written = []
        try:
            with SignalsStop() as stop:
                try:
                    result = super().main(*args, **kwargs)
                    if stop.stopping:  # our exception was swallowed (a callback's "Exception ignored")
                        raise Interrupted(stop.pending)
                    return result
                finally:
                    for cleanup in _CLEANUPS:  # e.g. a temporary folder whose `finally` a signal came before
                        cleanup()
        except Interrupted as e:
            exit_interrupted(e.signum, f"; '{self.written[-1]}' was written" if self.written else
                             "; nothing was written")
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort as e:
            if isinstance(e.__context__, KeyboardInterrupt):  # raised by something other than our handler
                exit_interrupted(signal.SIGINT)
            click.echo("error: aborted", err=True)
            sys.exit(1)
