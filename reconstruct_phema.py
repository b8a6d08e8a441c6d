"""Post-hoc EMA reconstruction (EDM2 §3.2, Alg. 3): build the EMA of any std from training snapshots."""

import math
import os

import click
import tqdm

from training import phema
from training.click_types import FiniteFloatRange
from training.metrics_io import RUN_DIR_WITHOUT_LOGGER
from training.phema_reconstruct import (  # noqa: F401 (profile_errors: tests use it from here)
    PhemaError,
    list_snapshots,
    parse_std_list,
    profile_errors,
    reconstruct_phema,
)
from training.snapshots import (
    TRUST_HELP,
    NetworkPickleError,
    parse_snapshot_name,
    save_network,
    snapshot_name,
    trust_pickles,
)
from training.tracking import LOGGERS, Tracker, TrackingError
from training.user_errors import plain_warnings


def _log_fit(tracker: Tracker, in_pkls: list[str], out_kimg: int, stds: list[float], paths: dict) -> None:
    """The reconstructed stds with their profile errors, filed at the output's training time."""
    in_kimg, in_std = zip(*(parse_snapshot_name(p)[1:] for p in in_pkls))
    errors = profile_errors(
        in_kimg, in_std, out_kimg, stds, phema.solve_posthoc_coefficients(in_kimg, in_std, out_kimg, stds)
    )
    rows = [dict(std=std, profile_error=float(err), file=paths[std]) for std, err in zip(stds, errors)]
    tracker.results('phema', rows, out_kimg * 1000)


def _parse_std_option(_ctx: click.Context, _param: click.Parameter, value: str) -> list[float]:
    try:
        return parse_std_list(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command()
@click.option(
    '--indir', metavar='DIR', type=str, required=True, help='Folder of training snapshots PREFIX-KIMG-STD.pkl'
)
@click.option('--outdir', metavar='DIR', type=str, required=True, help='Folder to write the reconstructed pickles to')
@click.option(
    '--outprefix', metavar='STR', type=str, default='phema', show_default=True, help='File name prefix of the outputs'
)
@click.option(
    '--outstd',
    metavar='LIST',
    type=str,
    required=True,
    callback=_parse_std_option,
    help='EMA stds to build, e.g. 0.050,0.100 or 0.010,0.015,...,0.250',
)
@click.option(
    '--outkimg',
    metavar='KIMG',
    type=click.IntRange(min=1),
    default=None,
    show_default='newest snapshot',
    help='Training time of the outputs in kimg',
)
@click.option(
    '--batch',
    'batch_size',
    metavar='INT',
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help='Outputs built per pass over the snapshots',
)
@click.option(
    '--max-error',
    metavar='FLOAT',
    type=FiniteFloatRange(min=0),
    default=0.1,
    show_default=True,
    help='Largest relative profile error of the fit to accept',
)
@click.option(
    '--skip-existing/--overwrite', default=True, show_default=True, help='Skip outputs whose file already exists'
)
@click.option('--trust-pickles', is_flag=True, callback=trust_pickles, expose_value=False, help=TRUST_HELP)
@click.option(
    '--snapshot-format',
    metavar='pkl|safetensors|both',
    type=click.Choice(['pkl', 'safetensors', 'both']),
    default='pkl',
    show_default=True,
    help='Output files: pickles, .safetensors or both',
)
@click.option(
    '--logger',
    'loggers',
    metavar='|'.join(LOGGERS),
    type=click.Choice(LOGGERS),
    multiple=True,
    help='Log the stds and fit errors to the run in TensorBoard or W&B (repeatable)  [default: none]',
)
@click.option('--run-dir', metavar='DIR', type=str, default=None, help='Training run to log to  [default: --indir]')
def main(
    indir: str,
    outdir: str,
    outprefix: str,
    outstd: list[float],
    outkimg: int | None,
    batch_size: int,
    max_error: float,
    skip_existing: bool,
    snapshot_format: str,
    loggers: tuple,
    run_dir: str | None,
) -> None:
    """Reconstruct post-hoc EMA networks of any std from the snapshots of a training run.

    Examples:

    \b
    # Ten EMA lengths at the end of the demo run
    python reconstruct_phema.py --indir=runs/demo --outdir=runs/demo/phema --outstd=0.040,0.050,...,0.130

    \b
    # A sweep of 49 stds at kimg 67108, 8 per pass over the snapshots
    python reconstruct_phema.py --indir=runs/img512-xs --outdir=out/img512-xs \\
        --outstd=0.010,0.015,...,0.250 --outkimg=67108 --batch=8
    """
    try:
        tracker = Tracker(run_dir or indir, loggers)
        if run_dir is not None and not loggers:
            raise PhemaError(RUN_DIR_WITHOUT_LOGGER)
        if loggers and run_dir is not None and not os.path.isdir(run_dir):
            raise PhemaError(f'--run-dir={run_dir} is not a folder; name the training run to log to.')
        if not outprefix or '/' in outprefix or os.sep in outprefix:
            raise PhemaError(f'--outprefix={outprefix!r}: give the start of a file name, e.g. phema (no folder).')
        if os.path.exists(outdir) and not os.path.isdir(outdir):
            raise PhemaError(f'--outdir={outdir} is a file, not a folder; name a folder for the reconstructions.')
        in_pkls = list_snapshots(indir, exclude_prefix=outprefix)
        outkimg = outkimg if outkimg is not None else max(parse_snapshot_name(p)[1] for p in in_pkls)
        if outkimg == 0:
            raise PhemaError(
                f'The snapshots in {indir} are all from the first kimg of training (named kimg 0); post-hoc EMA '
                f'needs snapshots from 1 kimg on: train longer (--duration=1Ki or more) and snapshot again.'
            )
        ext = 'safetensors' if snapshot_format == 'safetensors' else 'pkl'
        out_paths = {std: os.path.join(outdir, snapshot_name(outprefix, outkimg, std, ext)) for std in outstd}
        todo = [std for std in outstd if not (skip_existing and os.path.isfile(out_paths[std]))]
        if len(todo) < len(outstd):
            click.echo(f'Skipping {len(outstd) - len(todo)} existing outputs in {outdir}.')
        if not todo:
            return
        passes = math.ceil(len(todo) / batch_size)
        click.echo(
            f'Reconstructing {len(todo)} EMA stds at kimg {outkimg} from {len(in_pkls)} snapshots in '
            f'{passes} pass{"es" if passes > 1 else ""} over them.'
        )
        recons = reconstruct_phema(in_pkls, todo, outkimg, batch_size=batch_size, max_error=max_error, verbose=True)
        for std, data in recons:
            os.makedirs(outdir, exist_ok=True)  # only once the fit checks have passed
            save_network(data, out_paths[std], snapshot_format)
            tqdm.tqdm.write(f'Saved {out_paths[std]}')
            del data  # keep only one output alive outside the reconstruction
        if tracker.names:
            _log_fit(tracker, in_pkls, outkimg, todo, out_paths)
    except (PhemaError, NetworkPickleError, TrackingError) as e:
        raise click.ClickException(str(e)) from None


if __name__ == '__main__':
    plain_warnings()
    main()
