"""Quality against cost of the ODE solvers: RMSE of each solver's images against a Heun reference of
--reference-steps steps (256 by default: 511 NFE).

Every setting starts from the same per-seed noise (and the same random class), so the difference to the
reference is the solver's own discretisation error, measured in network space (pixels in [-1, 1]) and
in 8-bit levels. Steps are chosen per solver so that the network evaluations (NFE) match the targets:
Heun evaluates 2N - 1 times in N steps, the others N times. Trains the demo-tiny preset when no net is given.

    python bench/solver_error.py                                  # trains runs/demo-tiny if needed
    python bench/solver_error.py --net=runs/demo --seeds=0-63 --plot=docs/solver_error.png
"""

import os
import platform
import subprocess
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from training.generation import load_network, sample  # noqa: E402
from training.solvers import ORDERS, num_evaluations  # noqa: E402
from training.user_errors import run_with_one_line_errors  # noqa: E402

SETTINGS = [  # (solver, schedule)
    ('heun', 'karras'),
    ('euler', 'karras'),
    ('dpm++2m', 'karras'),
    ('dpm++3m', 'karras'),
    ('unipc', 'karras'),
    ('dpm++2m', 'logsnr-uniform'),
    ('dpm++3m', 'logsnr-uniform'),
]


def steps_for(solver: str, nfe: int) -> int:
    return (nfe + 1) // 2 if solver == 'heun' else nfe


def measure(net: torch.nn.Module, seeds: list[int], nfes: list[int], reference_steps: int) -> list[dict]:
    """Rows of dict(solver, schedule, steps, nfe, rmse, seconds), the reference first."""
    with torch.no_grad():
        start = time.perf_counter()
        ref = sample(net, seeds, num_steps=reference_steps).latents.double()
        rows = [dict(solver='heun', schedule='karras', steps=reference_steps, nfe=num_evaluations('heun', reference_steps),
                     rmse=0.0, seconds=time.perf_counter() - start)]  # fmt: skip
        for solver, schedule in SETTINGS:
            for target in nfes:
                steps = steps_for(solver, target)
                if steps < ORDERS[solver] and solver != 'heun':
                    continue
                start = time.perf_counter()
                out = sample(net, seeds, num_steps=steps, solver=solver, schedule=schedule).latents.double()
                rmse = float((out - ref).square().mean().sqrt())
                nfe = num_evaluations(solver, steps)
                rows.append(dict(solver=solver, schedule=schedule, steps=steps, nfe=nfe, rmse=rmse,
                                 seconds=time.perf_counter() - start))  # fmt: skip
                print(f'{solver:8s} {schedule:14s} NFE {nfe:3d}  RMSE {rmse:.4f}', file=sys.stderr)
    return rows


def markdown_table(rows: list[dict], nfes: list[int]) -> str:
    """One line per (solver, schedule), one column per target NFE: RMSE (and the exact NFE when it differs)."""
    lines = ['| solver | schedule | ' + ' | '.join(f'NFE ≈ {n}' for n in nfes) + ' |', '|---|---|' + '---|' * len(nfes)]
    for solver, schedule in SETTINGS:
        cells = []
        for target in nfes:
            row = next((r for r in rows[1:] if (r['solver'], r['schedule']) == (solver, schedule)
                        and r['steps'] == steps_for(solver, target)), None)  # fmt: skip
            exact = '' if row is None or row['nfe'] == target else f' ({row["nfe"]})'
            cells.append('—' if row is None else f'{row["rmse"]:.3g}{exact}')
        lines.append(f'| {solver} | {schedule} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot(rows: list[dict], nfes: list[int], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for solver, schedule in SETTINGS:
        pts = [(r['nfe'], r['rmse']) for r in rows[1:] if (r['solver'], r['schedule']) == (solver, schedule)]
        ax.plot(*zip(*pts), marker='o', label=f'{solver} ({schedule})', linestyle='-' if schedule == 'karras' else '--')
    ax.set(xscale='log', yscale='log', xlabel='network evaluations per image (NFE)', title=title)
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.minorticks_off()
    ax.set_ylabel(f'RMSE vs {rows[0]["nfe"]}-NFE Heun (pixels in [-1, 1])')  # rows[0]: the reference
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with dnnlib.util.atomic_write(path) as f:
        fig.savefig(f, format='png')
    plt.close(fig)


@click.command()
@click.option('--net', metavar='PKL|DIR', type=str, default=None, help='Network  [default: train demo-tiny]')
@click.option(
    '--outdir',
    metavar='DIR',
    type=str,
    default='runs/demo-tiny',
    show_default=True,
    help='Folder to train demo-tiny in when --net is not given.',
)
@click.option('--seeds', metavar='LIST', type=str, default='0-31', show_default=True, help='Seeds, e.g. 0-31.')
@click.option('--nfe', metavar='LIST', type=str, default='5,10,20,35,63', show_default=True, help='Target NFEs.')
@click.option('--reference-steps', metavar='INT', type=click.IntRange(min=2), default=256, show_default=True,
              help='Heun steps of the reference (2N - 1 NFE).')  # fmt: skip
@click.option('--plot', 'plot_path', metavar='PNG', type=str, default=None, help='Also write a log-log plot here.')
def main(net: str | None, outdir: str, seeds: str, nfe: str, reference_steps: int, plot_path: str | None) -> None:
    """Print a markdown table of RMSE against NFE for each solver and schedule."""
    outdir = os.path.abspath(outdir)  # training runs with the repository as its folder
    if net is None:
        if not os.path.isdir(outdir):
            subprocess.run(
                [sys.executable, 'train_edm2.py', f'--outdir={outdir}', '--preset=demo-tiny'],
                check=True,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
        net = outdir
    model = load_network(net, torch.device('cpu'), verbose=True)[0]
    seed_list = dnnlib.util.parse_int_list(seeds)
    nfes = [int(n) for n in nfe.split(',')]
    start = time.perf_counter()
    rows = measure(model, seed_list, nfes, reference_steps)
    shape = f'{model.img_channels}x{model.img_resolution}x{model.img_resolution}'
    print(f'{len(seed_list)} images {shape}; {platform.processor() or platform.machine()}, '
          f'{torch.get_num_threads()} threads; {time.perf_counter() - start:.0f} s in all')  # fmt: skip
    print(markdown_table(rows, nfes))
    if plot_path is not None:
        plot(rows, nfes, plot_path, f'{os.path.basename(os.path.normpath(net))}: {len(seed_list)} images {shape}')


if __name__ == '__main__':
    run_with_one_line_errors(main)
