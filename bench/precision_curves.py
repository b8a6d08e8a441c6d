"""Loss curves of the same short training run in fp32 and bf16 (same seed, data order and noise draws), and their
images/s, to show that bf16 trains like fp32. Plots both curves into a PNG.

    python bench/precision_curves.py --preset=demo --duration=8Ki --plot=docs/precision_curves.png
    python bench/precision_curves.py --preset=demo-tiny --duration=4Ki --threads=1     # quick
"""

import json
import os
import sys
import tempfile

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from training.run_config import setup_training_config  # noqa: E402
from training.training_loop import training_loop  # noqa: E402


def train_curve(preset: str, precision: str, duration: int, status: int, run_dir: str) -> tuple[list, list]:
    """(images seen, mean loss per status interval) of a fresh run of `preset` in `precision` on the CPU."""
    opts = dict(cond=True, workers=0, ls=1, bench=False, snapshot_fp32=False, seed=0, vae='unused')
    c = setup_training_config(preset, None, precision=precision, **opts)
    c.update(total_nimg=duration, status_nimg=status, snapshot_nimg=None, checkpoint_nimg=None)
    training_loop(run_dir=run_dir, device=torch.device('cpu'), **c)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    rows = [row for row in rows if 'Loss/loss' in row]
    return [row['Progress/kimg'] * 1e3 for row in rows], [row['Loss/loss'] for row in rows]


@click.command()
@click.option('--preset', metavar='STR', default='demo', show_default=True, help='A demo preset (makes its data).')
@click.option(
    '--duration', metavar='NIMG', type=dnnlib.util.parse_nimg, default='8Ki', show_default=True, help='Images per run.'
)
@click.option(
    '--status',
    metavar='NIMG',
    type=dnnlib.util.parse_nimg,
    default='512',
    show_default=True,
    help='Loss recorded every NIMG images.',
)
@click.option('--threads', metavar='INT', type=click.IntRange(min=1), default=None, help='torch CPU threads.')
@click.option('--plot', metavar='PNG', type=str, default=None, help='Write both curves to this PNG.')
def main(preset: str, duration: int, status: int, threads: int | None, plot: str | None) -> None:
    """Train the same run in fp32 and in bf16 and compare the loss curves."""
    if threads is not None:
        torch.set_num_threads(threads)
    curves = {}
    for precision in ('fp32', 'bf16'):
        with tempfile.TemporaryDirectory() as run_dir:
            curves[precision] = train_curve(preset, precision, duration, status, run_dir)
    for precision, (nimg, loss) in curves.items():  # Speed is bench/train_speed.py's: the first run here pays start-up.
        print(f'{precision} losses', np.round(loss, 3).tolist())
    gap = np.abs(np.array(curves['bf16'][1]) - np.array(curves['fp32'][1]))
    print(f'bf16 - fp32 loss: mean |gap| {gap.mean():.4f}, last-quarter mean gap {gap[-len(gap) // 4 :].mean():.4f}')
    if plot is not None:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for precision, (nimg, loss) in curves.items():
            ax.plot(nimg, loss, label=precision)
        ax.set(xlabel='training images', ylabel=f'loss (mean of {status} images)', title=f'{preset}: fp32 vs bf16')
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(plot) or '.', exist_ok=True)
        fig.savefig(plot, dpi=100)
        print(f'Wrote {plot}')


if __name__ == '__main__':
    main()
