"""Kill soak: SIGKILL a small training run N times at random moments (some of them while a checkpoint is being
written), re-run it each time until it finishes, and compare its final weights with an uninterrupted run.

    python bench/kill_soak.py --kills=20
"""

import glob
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from training.output_paths import OutputPathError, check_output_folder  # noqa: E402


def _command(outdir: str, args: list[str]) -> list[str]:
    return [sys.executable, os.path.join(ROOT, 'train_edm2.py'), f'--outdir={outdir}', *args]


def _start(outdir: str, args: list[str], env: dict) -> subprocess.Popen:
    out = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return subprocess.Popen(_command(outdir, args), env=env, cwd=ROOT, start_new_session=True, **out)


def _run(outdir: str, args: list[str], env: dict) -> None:
    """Run (or resume) to the end."""
    if subprocess.run(_command(outdir, args), env=env, cwd=ROOT, capture_output=True).returncode != 0:
        raise click.ClickException(f'the run failed; see {outdir}/log.txt')


def _checkpoint_temp_files(outdir: str) -> set[str]:
    return set(glob.glob(os.path.join(glob.escape(outdir), '.training-state-*.tmp')))


def _final_state(outdir: str) -> dict:
    newest = sorted(glob.glob(os.path.join(outdir, 'training-state-*.pt')))[-1]
    return torch.load(newest, map_location='cpu', weights_only=False)


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    """The network's and every EMA's tensors of a training state, by name."""
    found = {f'net.{k}': v for k, v in state['net'].items()}
    for i, ema in enumerate(state['ema']['emas']):
        found.update({f'ema{i}.{k}': v for k, v in ema.items() if isinstance(v, torch.Tensor)})
    return found


def _kill_once(outdir: str, args: list[str], env: dict, rng: random.Random, aim_at_write: bool) -> str:
    """Start the run and SIGKILL it: 'write' (during a checkpoint write), 'kill' (elsewhere) or 'finished'."""
    stale = _checkpoint_temp_files(outdir)  # Left by an earlier kill; the run removes them as it starts.
    proc = _start(outdir, args, env)
    deadline = time.time() + rng.uniform(1.0, 8.0)
    while time.time() < deadline or aim_at_write:
        if proc.poll() is not None:
            if proc.returncode != 0:
                raise click.ClickException(f'the run failed: {proc.stderr.read().decode()[-2000:]}')
            return 'finished'
        if aim_at_write and _checkpoint_temp_files(outdir) - stale:
            break
        if aim_at_write and time.time() > deadline + 30:
            break
        time.sleep(0.0005 if aim_at_write else 0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    during_write = bool(_checkpoint_temp_files(outdir) - stale)
    proc.wait()
    proc.stderr.close()
    return 'write' if during_write else 'kill'


@click.command()
@click.option('--kills', metavar='INT', type=click.IntRange(min=1), default=20, show_default=True, help='SIGKILLs.')
@click.option('--duration', metavar='NIMG', type=str, default='4Ki', show_default=True, help='Run length.')
@click.option('--seed', metavar='INT', type=int, default=0, show_default=True, help='Seed of the kill times.')
@click.option('--outdir', metavar='DIR', type=str, default=None, help='Where the two runs go [default: a temp dir].')
def main(kills: int, duration: str, seed: int, outdir: str | None) -> None:
    """SIGKILL a demo-tiny run (batch 4, checkpoint every 16 images) --kills times, then compare weights."""
    if outdir is not None:
        try:
            check_output_folder('--outdir', outdir)
        except OutputPathError as e:
            raise click.ClickException(str(e)) from None
    outdir = os.path.abspath(outdir or tempfile.mkdtemp(prefix='kill-soak-'))  # training runs from the repository
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    args = ['--preset=demo-tiny', '--workers=0', '--batch=4', f'--duration={duration}', '--checkpoint=16']
    args += [f'--snapshot={duration}', f'--status={duration}']
    straight, soaked = os.path.join(outdir, 'straight'), os.path.join(outdir, 'soaked')
    t0 = time.time()
    _run(straight, args, env)
    straight_s = time.time() - t0
    rng = random.Random(seed)
    outcomes: list[str] = []
    while len(outcomes) < kills and 'finished' not in outcomes:
        outcomes.append(_kill_once(soaked, args, env, rng, aim_at_write=len(outcomes) % 3 == 2))
    if 'finished' not in outcomes:
        _run(soaked, args, env)
    a, b = _final_state(straight), _final_state(soaked)
    ta, tb = _tensors(a), _tensors(b)
    differ = [k for k in ta if k not in tb or not torch.equal(ta[k], tb[k])]
    done = outcomes.count('kill') + outcomes.count('write')
    verdict = 'identical' if not differ and a['cur_nimg'] == b['cur_nimg'] else f'DIFFERENT ({len(differ)} tensors)'
    print(
        f'{done} kills ({outcomes.count("write")} during checkpoint writes), {duration} images at batch 4: final '
        f'weights {verdict} ({len(ta)} net and EMA tensors compared); uninterrupted run {straight_s:.0f} s, '
        f'soak {time.time() - t0 - straight_s:.0f} s; runs in {outdir}'
    )
    if done < kills:
        print(f'The run finished after {done} kills; use a longer --duration for {kills}.')
    if differ:
        sys.exit(1)


if __name__ == '__main__':
    main()
