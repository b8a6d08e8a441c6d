"""Curves of a training run's stats.jsonl as one PNG, for people who use neither TensorBoard nor W&B.

Each scalar gets its own panel against training progress in kimg. A resumed run repeats the status lines a
crashed run wrote after its last checkpoint; the resumed run's values win, as in TensorBoard.

    python bench/plot_stats.py runs/demo                          # writes runs/demo/stats.png
    python bench/plot_stats.py runs/demo --keys=Loss,lr --out=out/demo-loss.png
"""

import json
import math
import os
import sys

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from training.output_paths import OutputPathError, check_output_file  # noqa: E402


def read_curves(path: str) -> dict[str, tuple[list[float], list[float]]]:
    """Scalar name -> (kimg, value) in kimg order from stats.jsonl; of lines at the same kimg the last wins.
    Lines that are not a status record (a write cut short by a full disk) are skipped with a warning."""
    rows: dict[float, dict] = {}
    unreadable = []
    with open(path, encoding='utf-8', errors='replace') as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    rows[round(float(row['Progress/kimg']), 6)] = row
                except (ValueError, TypeError, KeyError):
                    unreadable.append(number)
    if unreadable:
        print(f'Warning: {path}: skipped {len(unreadable)} unreadable line(s), first line {unreadable[0]}.')
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for kimg in sorted(rows):
        for key, value in rows[kimg].items():
            if key not in ('Progress/kimg', 'timestamp') and isinstance(value, (int, float)):
                xs, ys = curves.setdefault(key, ([], []))
                xs.append(kimg)
                ys.append(value)
    return curves


@click.command()
@click.argument('run', metavar='RUN|STATS')
@click.option('--out', metavar='PNG', type=str, default=None, help='Output image  [default: RUN/stats.png]')
@click.option(
    '--keys', metavar='LIST', type=str, default=None, help='Plot only scalars whose name contains one of these.'
)
def main(run: str, out: str | None, keys: str | None) -> None:
    """Plot the scalars of a run folder's stats.jsonl (or of the file itself) into one PNG."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    path = os.path.join(run, 'stats.jsonl') if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise click.ClickException(f'{path} not found; give a run folder of train_edm2.py or its stats.jsonl.')
    out = out or os.path.join(os.path.dirname(path), 'stats.png')
    try:
        check_output_file('--out', out, ('.png',), [('RUN', path)])
    except OutputPathError as e:
        raise click.ClickException(str(e)) from None
    curves = read_curves(path)
    if keys is not None:
        wanted = [k.strip() for k in keys.split(',') if k.strip()]
        curves = {name: c for name, c in curves.items() if any(w in name for w in wanted)}
    if not curves:
        raise click.ClickException(f'{path} holds no scalars{" matching --keys" if keys else ""} to plot.')
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
    for ax, (name, (xs, ys)) in zip(axes.flat, sorted(curves.items())):
        ax.plot(xs, ys, marker='.' if len(xs) < 50 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel('kimg')
        ax.grid(alpha=0.3)
        print(f'{name}: {len(xs)} points')
    for ax in list(axes.flat)[len(curves) :]:
        ax.set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with dnnlib.util.atomic_write(out) as f:
        fig.savefig(f, format='png', dpi=100)
    print(f'Saved {out}')


if __name__ == '__main__':
    main()
