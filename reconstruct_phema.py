"""Post-hoc EMA reconstruction (EDM2 §3.2, Alg. 3): build the EMA of any std from training snapshots."""

import copy
import glob
import math
import os
from collections.abc import Iterator

import click
import numpy as np
import torch
import tqdm

import dnnlib
from training import phema
from training.snapshots import (
    NetworkPickleError,
    load_network_pickle,
    parse_snapshot_name,
    save_network_pickle,
    snapshot_name,
)
from training.tracking import LOGGERS, Tracker, TrackingError


class PhemaError(Exception):
    """A reconstruction that cannot be done as asked; the message is one sentence for the user."""


def parse_std_list(s: str) -> list[float]:
    """'0.050,0.100' or '0.010,0.015,...,0.250' (the step comes from the two values before '...')."""
    tokens = [t.strip() for t in s.split(',') if t.strip()]
    stds: list[float] = []
    for idx, tok in enumerate(tokens):
        if tok != '...':
            try:
                stds.append(float(tok))
            except ValueError:
                raise ValueError(f'{tok!r} is not a number') from None
            continue
        if idx < 2 or '...' in tokens[idx - 2 : idx] or idx + 1 >= len(tokens) or tokens[idx + 1] == '...':
            raise ValueError("'...' needs two values before it and one after it, e.g. 0.010,0.015,...,0.250")
        step, end = stds[-1] - stds[-2], float(tokens[idx + 1])
        num = (end - stds[-1]) / step if step != 0 else -1
        if num < 0 or abs(num - round(num)) > 1e-6:
            raise ValueError(f'{end} is not reached from {stds[-1]} in steps of {step:g}')
        start = stds[-1]
        stds += [round(start + k * step, 9) for k in range(1, round(num))]  # the end value follows as a token
    names: dict[str, float] = {}
    for std in stds:
        phema.std_to_exp(std)  # raises for a std no power-function profile has
        if f'{std:.3f}' in names:
            raise ValueError(f'stds {names[f"{std:.3f}"]} and {std} give the same file name; list each std once')
        names[f'{std:.3f}'] = std
    return stds


def list_snapshots(indir: str, exclude_prefix: str | None = None) -> list[str]:
    """Snapshot pickles `*-{kimg:07d}-{std:.3f}.pkl` in `indir`, oldest first (earlier outputs excluded)."""
    if not os.path.isdir(indir):
        raise PhemaError(f'Input folder not found: {indir}')
    found = []
    for path in glob.glob(os.path.join(indir, '*.pkl')):
        try:
            prefix, kimg, std = parse_snapshot_name(path)
        except ValueError:
            continue
        if prefix != exclude_prefix:
            found.append((kimg, std, path))
    if not found:
        raise PhemaError(
            f'No snapshots named PREFIX-KIMG-STD.pkl (e.g. network-snapshot-0008388-0.050.pkl) found in {indir}'
        )
    return [path for _kimg, _std, path in sorted(found)]


# Relative L2 error ‖Σ x_i p_i − p_target‖ / ‖p_target‖ of the reconstructed profiles, from the Gram matrix.
def profile_errors(in_kimg, in_std, out_kimg, out_std, coefs: np.ndarray) -> np.ndarray:
    in_kimg, in_std = np.asarray(in_kimg, np.float64), np.asarray(in_std, np.float64)
    out_kimg, out_std = np.broadcast_arrays(np.asarray(out_kimg, np.float64), np.asarray(out_std, np.float64))
    use = in_kimg > 0
    x = coefs[use]
    A = phema.power_function_correlation(in_kimg[use, None], in_std[use, None], in_kimg[None, use], in_std[None, use])
    b = phema.power_function_correlation(in_kimg[use, None], in_std[use, None], out_kimg[None], out_std[None])
    pp = phema.power_function_correlation(out_kimg, out_std, out_kimg, out_std)
    sq = pp - 2 * np.sum(x * b, axis=0) + np.sum(x * (A @ x), axis=0)
    return np.sqrt(np.maximum(sq, 0) / pp)


def _check_fit(
    in_kimg: list[int], in_std: list[float], out_kimg: int, out_std: list[float], coefs: np.ndarray, max_error: float
) -> None:
    errors = profile_errors(in_kimg, in_std, out_kimg, out_std, coefs)
    bad = [
        (std, err) for j, (std, err) in enumerate(zip(out_std, errors)) if not (err <= max_error and coefs[:, j].any())
    ]
    if not bad:
        return
    std, err = bad[0]
    usable = [k for k in in_kimg if 0 < k <= out_kimg]
    if not usable:
        why = f'no snapshot lies in 0 < kimg <= {out_kimg} (the oldest is at kimg {min(in_kimg)})'
    elif out_kimg > max(usable):
        why = (
            f'kimg {out_kimg} is past the newest usable snapshot (kimg {max(usable)}), and an EMA cannot be '
            f'extended beyond its last snapshot'
        )
    else:
        why = (
            f'{len(usable)} snapshots up to kimg {out_kimg} cannot form that profile (tracked stds: '
            f'{", ".join(f"{s:.3f}" for s in sorted(set(in_std)))}); use more snapshots or a std nearer the tracked ones'
        )
    raise PhemaError(
        f'Cannot reconstruct std {std:.3f} at kimg {out_kimg}: the least-squares fit leaves a relative '
        f'profile error of {err:.3f} > --max-error {max_error:g}, because {why}.'
    )


def _arch_signature(net: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in [*net.named_parameters(), *net.named_buffers()]}


def _check_same_arch(ref: tuple[str, dict], path: str, sig: dict) -> None:
    ref_path, ref_sig = ref
    if sig == ref_sig:
        return
    names = sorted(set(ref_sig) ^ set(sig)) or sorted(n for n in sig if sig[n] != ref_sig[n])
    name = names[0]
    detail = f'{name!r} is {ref_sig.get(name, "missing")} vs {sig.get(name, "missing")}'
    raise PhemaError(
        f'Snapshots {ref_path} and {path} hold different architectures ({detail}); '
        f'reconstruct from the snapshots of one run only.'
    )


def reconstruct_phema(
    in_pkls: list[str],
    out_std: list[float],
    out_kimg: int,
    batch_size: int = 8,
    max_error: float = 0.1,
    verbose: bool = False,
) -> Iterator[tuple[float, dict]]:
    """Yield (std, snapshot dict) for each std in `out_std`, the EMA at `out_kimg` rebuilt from `in_pkls`.

    Inputs are streamed one at a time; each pass over them builds `batch_size` outputs, accumulated in
    float32 and stored in the inputs' dtype. The other dict entries come from the newest input used.
    """
    if out_kimg <= 0:
        raise PhemaError(f'The output kimg must be positive, got {out_kimg}; post-hoc EMA needs some training.')
    if batch_size <= 0:
        raise PhemaError(f'The batch size must be positive, got {batch_size}.')
    inputs = []
    for path in in_pkls:
        try:
            _prefix, kimg, std = parse_snapshot_name(path)
        except ValueError as e:
            raise PhemaError(str(e)) from None
        inputs.append((kimg, std, path))
    inputs.sort()
    for (k0, s0, p0), (k1, s1, p1) in zip(inputs, inputs[1:]):
        if (k0, f'{s0:.3f}') == (k1, f'{s1:.3f}'):
            raise PhemaError(f'Snapshots {p0} and {p1} have the same kimg and std; keep the snapshots of one run only.')
    in_kimg, in_std, in_path = [k for k, _, _ in inputs], [s for _, s, _ in inputs], [p for _, _, p in inputs]
    out_std = list(out_std)
    coefs = phema.solve_posthoc_coefficients(in_kimg, in_std, out_kimg, out_std)
    _check_fit(in_kimg, in_std, out_kimg, out_std, coefs, max_error)

    batches = [list(range(i, min(i + batch_size, len(out_std)))) for i in range(0, len(out_std), batch_size)]
    uses = [[i for i in range(len(inputs)) if np.any(coefs[i, cols] != 0)] for cols in batches]
    ref = None
    with dnnlib.util.progress_bar(
        total=sum(map(len, uses)), unit='pkl', desc='Reconstructing', disable=not verbose
    ) as bar:
        for cols, use in zip(batches, uses):
            outs: list[torch.nn.Module | None] = [None] * len(cols)
            for i in use:
                data = load_network_pickle(in_path[i])
                net = data['ema']
                if not isinstance(net, torch.nn.Module):
                    raise PhemaError(f"{in_path[i]} holds no torch network under 'ema'.")
                sig = _arch_signature(net)
                ref = ref or (in_path[i], sig)
                _check_same_arch(ref, in_path[i], sig)
                for k, j in enumerate(cols):
                    if outs[k] is None:
                        outs[k] = _float32_zeros_like(net)
                    _accumulate(outs[k], net, coefs[i, j])
                dtypes = [p.dtype for p in net.parameters()]
                newest = {key: value for key, value in data.items() if key != 'ema'}, list(data)
                del data, net  # at most one input net alive at a time
                bar.update(1)
            extras, keys = newest
            for k, j in enumerate(cols):
                out, outs[k] = outs[k], None
                for p, dtype in zip(out.parameters(), dtypes):
                    p.data = p.data.to(dtype)
                yield out_std[j], {key: out if key == 'ema' else extras[key] for key in keys}
                del out


@torch.no_grad()
def _float32_zeros_like(net: torch.nn.Module) -> torch.nn.Module:
    out = copy.deepcopy(net).eval().requires_grad_(False)
    for p in out.parameters():
        p.data = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    return out


# θ_out += x_i · θ_i for parameters; buffers are taken from the input (the newest input wins).
@torch.no_grad()
def _accumulate(out: torch.nn.Module, net: torch.nn.Module, coef: float) -> None:
    for p_out, p_in in zip(out.parameters(), net.parameters()):
        p_out.add_(p_in.to(torch.float32), alpha=float(coef))
    for b_out, b_in in zip(out.buffers(), net.buffers()):
        b_out.copy_(b_in)


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
    type=click.FloatRange(min=0),
    default=0.1,
    show_default=True,
    help='Largest relative profile error of the fit to accept',
)
@click.option(
    '--skip-existing/--overwrite', default=True, show_default=True, help='Skip outputs whose file already exists'
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
        if loggers and run_dir is not None and not os.path.isdir(run_dir):
            raise PhemaError(f'--run-dir={run_dir} is not a folder; name the training run to log to.')
        in_pkls = list_snapshots(indir, exclude_prefix=outprefix)
        outkimg = outkimg if outkimg is not None else max(parse_snapshot_name(p)[1] for p in in_pkls)
        if outkimg == 0:
            raise PhemaError(
                f'The snapshots in {indir} are all from the first kimg of training (named kimg 0); post-hoc EMA '
                f'needs snapshots from 1 kimg on: train longer (--duration=1Ki or more) and snapshot again.'
            )
        out_paths = {std: os.path.join(outdir, snapshot_name(outprefix, outkimg, std)) for std in outstd}
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
            save_network_pickle(data, out_paths[std])
            tqdm.tqdm.write(f'Saved {out_paths[std]}')
            del data  # keep only one output alive outside the reconstruction
        if tracker.names:
            _log_fit(tracker, in_pkls, outkimg, todo, out_paths)
    except (PhemaError, NetworkPickleError, TrackingError) as e:
        raise click.ClickException(str(e)) from None


if __name__ == '__main__':
    main()
