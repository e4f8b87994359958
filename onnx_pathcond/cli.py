"""`onnx-pathcond IN OUT`: parse the command line, call the API, print. No maths here."""

from __future__ import annotations

import ast
import os
import signal
import sys
from typing import Optional


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

import click  # noqa: E402

from . import __version__  # noqa: E402
from .errors import InputError, PathCondError, keyword  # noqa: E402
from .options import (BACKENDS, BN_STATISTICS, CRITERIA, DEFAULT_BACKEND, DEFAULT_CRITERION, DEFAULT_DEVICE,  # noqa: E402
                      DEFAULT_PRECISION, DEFAULT_RTOL, DEFAULT_SEED, DEFAULT_SOLVER, DEVICES, ENORM_SOLVERS,
                      NOISE_FACTOR, PRECISIONS, RTOL_CEILING, SOLVERS)
from .process import OneLineErrors, held_signals  # noqa: E402
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


def _as_flag(name: str, value: Optional[str]) -> str:
    """An option the library names by its keyword, spelled as this command's flag: `--device
    cuda`, `--bn-statistics`, `--no-verify` (the keyword itself when no flag takes it)."""
    param = next((p for p in main.params if p.name == name and isinstance(p, click.Option)), None)
    if param is None:
        return keyword(name, value)
    if value is None:
        return param.opts[0]
    try:
        given = ast.literal_eval(value)
    except (ValueError, SyntaxError):  # a repr that is no literal (a numpy scalar's): as it reads
        given = value
    if isinstance(given, bool) and (param.is_flag or param.secondary_opts):
        return param.opts[0] if given else (param.secondary_opts or [f"no {param.opts[0]}"])[0]
    return f"{param.opts[0]} {given}"


def _fail(error: PathCondError) -> None:
    click.echo(f"error: {error.spelled(_as_flag)}", err=True)
    sys.exit(error.exit_code)


class _NewFile(click.ParamType):
    """A file the run will write: not a folder, in a folder that exists."""

    name = "file"

    def convert(self, value, param, ctx):
        path = os.fspath(value)
        if not path or os.path.isdir(path):
            self.fail(f"'{path}' is a folder, not a file path", param, ctx)
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            self.fail(f"the folder of '{path}' does not exist", param, ctx)
        return path


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


@click.command(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]},
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
@click.option("--precision", type=click.Choice(PRECISIONS), default=DEFAULT_PRECISION, show_default=True,
              help="Arithmetic of the numpy backend's diag(G): auto runs float32 where the weights are at most "
                   "32-bit and the result is proven no worse than no rescaling with its error bound, float64 "
                   "otherwise (docs/design.md §2.6); float64 always runs float64.")
@click.option("--verify/--no-verify", "verify_output", default=True, show_default=True,
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
@click.option("--report", type=_NewFile(),
              help="Write the full report as JSON to this file.")
@click.option("--factors", type=_NewFile(),
              help="Also write, for every rewritten tensor, its element-wise factor new/old (float64, exact) to "
                   "this .npz file, under the tensor's name: for carrying an optimizer's state in another "
                   "framework (first moments divided by it, second moments by its square).")
@click.option("--dry-run", is_flag=True, help="Only analyse: print the groups and barriers, write nothing.")
@click.option("--overwrite", is_flag=True, help="Allow OUT to be IN (replaced atomically).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors and warnings.")
@click.option("-v", "--verbose", is_flag=True, help="Print every layer and every frozen range.")
@click.version_option(__version__, "--version")
def main(input_path, output_path, input_shapes, criterion, solver, max_iter, tol, backend, device, precision,
         verify_output, rtol, seed, bn_statistics, report, factors, dry_run, overwrite, quiet, verbose):
    """Rescale the ReLU network in IN with PathCond (or ENorm) and write the equivalent model to OUT.

    The output has the same graph, names, shapes and dtypes; only weight values change, so the
    rescaled weights load back into the original framework by name.
    """
    try:
        with held_signals():  # numpy, onnx, onnxruntime: loaded here, so that Ctrl-C is ours from the start
            from . import api
            import onnxruntime  # noqa: F401  (the checks import it later; loaded now for the same reason)

        if output_path is None and not dry_run:
            raise InputError("missing OUT (the output path); use --dry-run to only analyse")
        progress = Progress(verbose=verbose)
        try:
            result = api.rescale_file(input_path, output_path, input_shapes=list(input_shapes), criterion=criterion,
                                      solver=solver, max_iter=max_iter, tol=tol, verify_output=verify_output,
                                      rtol=rtol, seed=seed, backend=backend, device=device, precision=precision,
                                      bn_statistics=bn_statistics, dry_run=dry_run, factors=factors, report=report,
                                      overwrite=overwrite, progress=progress)
        finally:
            progress.close()
        if not dry_run:
            click.get_current_context().command.written.append(output_path)
    except PathCondError as e:
        _fail(e)
    if not quiet:
        click.echo(result.summary(verbose=verbose or dry_run))
    else:
        for w in result.warnings:
            click.echo(f"warning: {w}", err=True)


if _before_loading is not None:
    signal.signal(signal.SIGINT, _before_loading)

if __name__ == "__main__":  # pragma: no cover
    main()
