"""`onnx-pathcond IN OUT`: parse the command line, call the API, print. No maths here."""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def _exit_interrupted(signum: int, after: str = "") -> None:
    """One line and the shell's exit code for a signal: 128 + its number (130 for Ctrl-C)."""
    sys.stderr.write(f"error: interrupted ({signal.Signals(signum).name}){after}\n")
    sys.stderr.flush()
    sys.exit(128 + signum)


def _interrupted_while_loading(signum, frame):
    """Ctrl-C while this module loads: nothing is open or written yet, so leave at once,
    with the same line as later, rather than a KeyboardInterrupt's traceback."""
    sys.stderr.write(f"error: interrupted ({signal.Signals(signum).name})\n")
    sys.stderr.flush()
    os._exit(128 + signum)


# Only while this module loads (put back at its end, so that importing it changes nothing);
# `main` then installs its own handlers. The heavy modules (onnx, onnxruntime) are imported
# inside `main`, and the package's __init__ imports nothing heavy, so that Ctrl-C is ours from
# the first tenth of a second on.
_before_loading = None
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    try:
        _before_loading = signal.signal(signal.SIGINT, _interrupted_while_loading)
    except ValueError:  # imported from a thread other than the main one
        pass

import threading  # noqa: E402

import click  # noqa: E402

from . import __version__  # noqa: E402
from .errors import InputError, PathCondError  # noqa: E402
from .options import (BACKENDS, BN_STATISTICS, CRITERIA, DEFAULT_BACKEND, DEFAULT_CRITERION, DEFAULT_DEVICE,  # noqa: E402
                      DEFAULT_RTOL, DEFAULT_SEED, DEFAULT_SOLVER, DEVICES, ENORM_SOLVERS, NOISE_FACTOR, RTOL_CEILING,
                      SOLVERS)
from .progress import Progress  # noqa: E402

EXIT_CODES_HELP = """\b
Exit codes: 0 written (or dry run); 1 the model cannot be processed;
2 bad command line or input file; 3 the rescaled model failed the equivalence check;
128+N stopped by signal N (130 Ctrl-C).
"""


def _short(x: float) -> str:
    """1e-06 as '1e-6', the way the README writes tolerances."""
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _fail(error: PathCondError) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(error.exit_code)


class _Interrupted(BaseException):
    """A signal asking the run to stop. Raised in the main thread by our handler, it unwinds
    like KeyboardInterrupt, so every `finally` runs and the temporary folder next to OUT is
    removed; unlike KeyboardInterrupt, click does not turn it into its own "Aborted!"."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# SIGTERM (kill, a job scheduler) and SIGHUP (the terminal closed) would otherwise end the
# process on the spot and leave the temporary folder behind; they take Ctrl-C's way out.
_STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


class _SignalsStop:
    """While in the block, the stop signals raise `_Interrupted` in the main thread; the
    previous handlers are put back on leaving. A signal that was ignored when we started
    (nohup, a background job) stays ignored. A second signal while the first one's cleanup
    runs is ignored, so that the cleanup itself is not cut short.

    Inside `deferred()` a signal is only noted, and raised when the block ends: an exception
    raised while an extension module initialises can crash the interpreter (seen: onnx's
    protobuf module, a segmentation fault), and one raised inside an import lock's callback is
    swallowed ("Exception ignored"), so the run would go on as if Ctrl-C had not been pressed."""

    active: "_SignalsStop | None" = None  # the instance whose handlers are installed

    def __enter__(self):
        self.previous = {}
        self.stopping = False
        self.deferring = False
        self.pending = None
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers (the command run from a thread)
        for signum in _STOP_SIGNALS:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue
            self.previous[signum] = previous
            signal.signal(signum, self._handle)
        _SignalsStop.active = self
        return self

    def _handle(self, signum, frame):
        if self.stopping or self.pending is not None:
            return
        self.pending = signum
        if self.deferring:
            return
        self.stopping = True
        raise _Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            self.stopping = True
            raise _Interrupted(self.pending)

    def __exit__(self, *exc):
        _SignalsStop.active = None
        for signum, previous in self.previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        return False


def _import_heavy_modules():
    """numpy, onnx and onnxruntime, with any stop signal held until they are loaded (see
    `_SignalsStop.deferred`). Imported here, not at the top, so that Ctrl-C during their
    second or so of loading is answered by our handler at all."""
    stop = _SignalsStop.active
    with stop.deferred() if stop is not None else contextlib.nullcontext():
        from . import api  # noqa: F401
        import onnxruntime  # noqa: F401  (imported later by the checks; loaded here for the same reason)


class _OneLineErrors(click.Command):
    """click's usage errors, like ours, as one `error: ...` line (exit code 2); a stop
    signal as one `error: interrupted (SIG...)` line and exit code 128 + its number."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            with _SignalsStop() as stop:
                try:
                    result = super().main(*args, **kwargs)
                    if stop.stopping:  # our exception was swallowed (a callback's "Exception ignored")
                        raise _Interrupted(stop.pending)
                    return result
                finally:
                    modelfile = sys.modules.get(f"{__package__}.modelfile")
                    if modelfile is not None:  # a temporary folder whose `finally` a signal came before
                        modelfile.discard_unfinished()
        except _Interrupted as e:
            _exit_interrupted(e.signum, f"; '{_written[-1]}' was written" if _written else "; nothing was written")
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort as e:
            if isinstance(e.__context__, KeyboardInterrupt):  # raised by something other than our handler
                _exit_interrupted(signal.SIGINT)
            click.echo("error: aborted", err=True)
            sys.exit(1)


# The output once it is in place, so that a late interruption does not claim nothing was written.
_written = []


class _Tolerance(click.ParamType):
    """A finite number >= 0 (click's FloatRange lets NaN and infinity through)."""

    name = "float"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(value)
            except ValueError:
                self.fail(f"'{value}' is not a number", param, ctx)
        if not 0 <= number < float("inf"):
            self.fail(f"{value} is not a finite number >= 0", param, ctx)
        return number


@click.command(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]},
               epilog=EXIT_CODES_HELP)
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=True, path_type=str))
@click.argument("output_path", metavar="OUT", required=False, type=click.Path(path_type=str))
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D0xD1x...",
              help="Fix the shape of a graph input with dynamic dimensions (repeatable).")
@click.option("--criterion", type=click.Choice(CRITERIA), default=DEFAULT_CRITERION, show_default=True,
              help="What the rescaling minimises. pathcond: the PathCond criterion on diag(G). enorm: "
                   "Equi-normalization, the sum of the squared parameters (needs no diag(G); its coordinate "
                   "descent runs to convergence by default).")
@click.option("--solver", type=click.Choice(list(SOLVERS)), default=DEFAULT_SOLVER, show_default=True,
              help=f"cd: the authors' cyclic coordinate descent ({SOLVERS['cd'].max_iter} sweeps). exact: the "
                   f"minimiser of the criterion (can rescale weights by 1e3 or more; see README).")
@click.option("--max-iter", type=click.IntRange(min=0), default=None,
              help=f"Sweeps of coordinate descent (default {SOLVERS['cd'].max_iter}) or iterations of the exact "
                   f"solver (default {SOLVERS['exact'].max_iter}); with --criterion enorm the defaults are "
                   f"{ENORM_SOLVERS['cd'].max_iter} sweeps and {ENORM_SOLVERS['exact'].max_iter} iterations.")
@click.option("--tol", type=_Tolerance(), default=None,
              help=f"Stop when a sweep changes Σ|Δu| by less (cd, default {_short(SOLVERS['cd'].tol)}) or when the "
                   f"gradient's largest entry falls below this fraction of its value at no rescaling (exact, "
                   f"default {_short(SOLVERS['exact'].tol)}); with --criterion enorm the defaults are cd "
                   f"{_short(ENORM_SOLVERS['cd'].tol)} and exact {_short(ENORM_SOLVERS['exact'].tol)}.")
@click.option("--backend", type=click.Choice(BACKENDS), default=DEFAULT_BACKEND, show_default=True,
              help="What computes diag(G): numpy, or onnxruntime (auto: onnxruntime with --device cuda, numpy on "
                   "the CPU, where it measured faster and leaner).")
@click.option("--device", type=click.Choice(DEVICES), default=DEFAULT_DEVICE, show_default=True,
              help="cuda: run the onnxruntime backend on its CUDA execution provider (needs onnx-pathcond[gpu]).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check on random inputs that the output computes the same function.")
@click.option("--rtol", type=_Tolerance(), default=None,
              help=f"Largest accepted output difference relative to the output's scale "
                   f"(default: {_short(DEFAULT_RTOL['float32'])} for a model computing in float32, "
                   f"{_short(DEFAULT_RTOL['float16'])} in float16, raised to {NOISE_FACTOR:g} times the "
                   f"model's own rounding noise when that is larger, at most {RTOL_CEILING:g}).")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True,
              help="Seed of the random verification inputs.")
@click.option("--bn-statistics", is_flag=True, default=BN_STATISTICS,
              help="Also rescale the channels that feed a BatchNormalization, their scale carried by its running "
                   "mean and variance: exact in inference, in training mode only up to the BN's epsilon (see README). With the pathcond criterion only.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=str),
              help="Write the full report as JSON to this file.")
@click.option("--factors", "factors_path", type=click.Path(dir_okay=False, path_type=str),
              help="Also write, for every rewritten tensor, its element-wise factor new/old (float64, exact) to "
                   "this .npz file, under the tensor's name: for carrying an optimizer's state in another "
                   "framework (first moments divided by it, second moments by its square).")
@click.option("--dry-run", is_flag=True, help="Only analyse: print the groups and barriers, write nothing.")
@click.option("--overwrite", is_flag=True, help="Allow OUT to be IN (replaced atomically).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors and warnings.")
@click.option("-v", "--verbose", is_flag=True, help="Print every layer and every frozen range.")
@click.version_option(__version__, "--version")
def main(input_path, output_path, input_shapes, criterion, solver, max_iter, tol, backend, device, verify, rtol, seed,
         bn_statistics, report_path, factors_path, dry_run, overwrite, quiet, verbose):
    """Rescale the ReLU network in IN with PathCond (or ENorm) and write the equivalent model to OUT.

    The output has the same graph, names, shapes and dtypes; only weight values change, so the
    rescaled weights load back into the original framework by name.
    """
    del _written[:]
    try:
        _import_heavy_modules()
        from . import api
        from .modelfile import same_file

        if output_path is None and not dry_run:
            raise InputError("missing OUT (the output path); use --dry-run to only analyse")
        if report_path:
            if not os.path.isdir(os.path.dirname(os.path.abspath(report_path))):
                raise InputError(f"report directory '{os.path.dirname(report_path)}' does not exist")
            written = [] if dry_run or not output_path else [output_path, output_path + ".data"]
            if factors_path and not dry_run:
                written.append(factors_path)
            for other, what in ((input_path, "the input model"), *((path, "the output model, its data file or "
                                                                           "the factors file") for path in written)):
                if other and same_file(report_path, other):
                    raise InputError(f"--report '{report_path}' is {what}; choose another file for the report")
        names = [spec.rpartition(":")[0] for spec in input_shapes]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InputError(f"--input-shape given more than once for '{repeated[0]}'")
        if output_path is not None and not dry_run:
            api.check_output_path(output_path, input_path if os.path.exists(input_path) else None, overwrite)
        progress = Progress(verbose=verbose)
        try:
            model, report = api.rescale(input_path, input_shapes=list(input_shapes), criterion=criterion,
                                        solver=solver, max_iter=max_iter,
                                        tol=tol, verify_output=verify, rtol=rtol, seed=seed, dry_run=dry_run,
                                        backend=backend, device=device, progress=progress,
                                        output=None if dry_run else output_path, return_model=False,
                                        bn_statistics=bn_statistics, factors=factors_path,
                                        also_writes={"--report": report_path} if report_path else None)
        finally:
            progress.close()
        if not dry_run:
            _written[:] = [output_path]
    except PathCondError as e:
        _fail(e)
    if report_path:
        with open(report_path, "w") as f:
            f.write(report.to_json())
    if not quiet:
        click.echo(report.summary(verbose=verbose or dry_run))
    else:
        for w in report.warnings:
            click.echo(f"warning: {w}", err=True)


if _before_loading is not None:
    signal.signal(signal.SIGINT, _before_loading)

if __name__ == "__main__":  # pragma: no cover
    main()
