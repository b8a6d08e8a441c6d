import collections
import gc
import os
import weakref

import numpy as np
import pytest
import scipy.integrate
import torch
from click.testing import CliRunner

import reconstruct_phema
from training import phema, phema_reconstruct
from training.snapshots import load_network_pickle, save_network_pickle, snapshot_name

LIVE_NETS: 'weakref.WeakSet[Trajectory]' = weakref.WeakSet()  # every Trajectory alive, for memory counting


class Trajectory(torch.nn.Module):
    """Toy net: theta = (t/T, (t/T)², noise) at training time t; `width` changes the architecture."""

    def __init__(self, width: int = 3, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros([width], dtype=dtype))
        self.register_buffer('step', torch.zeros([], dtype=torch.int64))
        LIVE_NETS.add(self)

    def __setstate__(self, state: dict) -> None:  # unpickling and deepcopy
        super().__setstate__(state)
        LIVE_NETS.add(self)


def simulate_run(
    outdir, num_snapshots: int, steps_per_snapshot: int = 100, dtype=torch.float32, width: int = 3
) -> None:
    """Train the toy with PowerFunctionEMA, 10 images a step, and save snapshots as training does."""
    batch, total = 10, num_snapshots * steps_per_snapshot * 10
    net, noise = Trajectory(width, dtype), np.random.default_rng(0).uniform(-1, 1, num_snapshots * steps_per_snapshot)
    ema = phema.PowerFunctionEMA(net.train(), stds=[0.050, 0.100])
    for step in range(1, num_snapshots * steps_per_snapshot + 1):
        cur_nimg = step * batch
        with torch.no_grad():
            t = cur_nimg / total
            net.theta.copy_(torch.tensor([t, t * t, noise[step - 1]][:width]))
            net.step.fill_(step)
        ema.update(cur_nimg, batch)
        if step % steps_per_snapshot == 0:
            for ema_net, std in ema.get():
                data = dict(ema=ema_net, encoder=None, dataset_kwargs=dict(kimg=cur_nimg // 1000))
                save_network_pickle(
                    data, os.path.join(outdir, snapshot_name('network-snapshot', cur_nimg // 1000, std))
                )


def analytic_average(std: float, t: float) -> np.ndarray:
    """Power-function average ∫τ^γ f dτ / ∫τ^γ dτ over [0, t] of f = τ and τ² (closed forms)."""
    g = phema.std_to_exp(std)
    return np.array([(g + 1) / (g + 2) * t, (g + 1) / (g + 3) * t * t])


@pytest.fixture(scope='module')
def run32(tmp_path_factory):
    """32 snapshot pairs (every 1/32 of training, 100 steps apart) at kimg 1..32."""
    path = tmp_path_factory.mktemp('run32')
    simulate_run(path, 32)
    gc.collect()
    return str(path)


def snapshot_theta(run: str, kimg: int, std: float) -> np.ndarray:
    return (
        load_network_pickle(os.path.join(run, snapshot_name('network-snapshot', kimg, std)))['ema']
        .theta.detach()
        .numpy()
    )


@pytest.mark.parametrize('out_kimg', [32, 20])
def test_reconstruction_matches_closed_form_average(run32, out_kimg):
    stds = [0.03, 0.06, 0.09, 0.14, 0.2]
    in_pkls = reconstruct_phema.list_snapshots(run32)
    results = list(reconstruct_phema.reconstruct_phema(in_pkls, stds, out_kimg, batch_size=3))
    assert [std for std, _ in results] == stds
    for std, data in results:
        theta = data['ema'].theta.detach().numpy()[:2]
        np.testing.assert_allclose(theta, analytic_average(std, out_kimg / 32), rtol=1e-3)


@pytest.mark.parametrize('std', [0.050, 0.100])
def test_tracked_std_at_final_snapshot_reproduces_it(run32, std):
    ((_, data),) = reconstruct_phema.reconstruct_phema(reconstruct_phema.list_snapshots(run32), [std], 32)
    expected = snapshot_theta(run32, 32, std)  # includes the noise component, so weights must be exact
    np.testing.assert_allclose(data['ema'].theta.detach().numpy(), expected, rtol=1e-4)
    assert data['dataset_kwargs'] == dict(kimg=32) and list(data) == ['ema', 'encoder', 'dataset_kwargs']


def test_sweep_streams_inputs_once_per_pass(run32, tmp_path, monkeypatch):
    gc.collect()
    reads, peak, baseline = collections.Counter(), [0], len(LIVE_NETS)  # nets other tests left to the collector

    def counting_loader(path):
        data = load_network_pickle(path)
        reads[path] += 1
        peak[0] = max(peak[0], len(LIVE_NETS) - baseline)
        return data

    monkeypatch.setattr(phema_reconstruct, 'load_network_pickle', counting_loader)
    outdir = str(tmp_path / 'out')
    result = CliRunner().invoke(
        reconstruct_phema.main,
        [f'--indir={run32}', f'--outdir={outdir}', '--outstd=0.030,0.035,...,0.180', '--batch=8'],
    )
    assert result.exit_code == 0, result.output
    assert len(os.listdir(outdir)) == 31
    assert len(reads) == 64 and set(reads.values()) == {4}
    assert peak[0] <= 9, baseline


def test_cli_writes_snapshot_format_in_input_dtype_and_skips_existing(tmp_path, monkeypatch):
    indir, outdir = tmp_path / 'run', tmp_path / 'out'
    indir.mkdir()
    simulate_run(indir, 4, dtype=torch.float16)
    args = [f'--indir={indir}', f'--outdir={outdir}', '--outstd=0.100,0.050']
    result = CliRunner().invoke(reconstruct_phema.main, args)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(outdir)) == ['phema-0000004-0.050.pkl', 'phema-0000004-0.100.pkl']
    for std in [0.05, 0.1]:
        data = load_network_pickle(str(outdir / snapshot_name('phema', 4, std)))
        ema = data['ema']
        assert ema.theta.dtype == torch.float16 and not ema.theta.requires_grad and not ema.training
        np.testing.assert_allclose(ema.theta.detach().float().numpy(), snapshot_theta(str(indir), 4, std), rtol=2e-3)
        assert data['dataset_kwargs'] == dict(kimg=4) and int(ema.step) == 400
    monkeypatch.setattr(phema_reconstruct, 'load_network_pickle', lambda path: pytest.fail('read an input'))
    result = CliRunner().invoke(reconstruct_phema.main, args)
    assert result.exit_code == 0 and 'Skipping 2 existing' in result.output


def test_profile_errors_match_numerical_integration():
    in_kimg, in_std = [4, 4, 8, 8], [0.05, 0.10, 0.05, 0.10]
    coefs = phema.solve_posthoc_coefficients(in_kimg, in_std, [8, 8], [0.15, 0.03])
    errors = reconstruct_phema.profile_errors(in_kimg, in_std, 8, [0.15, 0.03], coefs)

    def profile(t, std):
        g = phema.std_to_exp(std)
        return lambda x: (g + 1) * x**g / t ** (g + 1) * (x <= t)

    for j, std in enumerate([0.15, 0.03]):
        parts, target = [profile(t, s) for t, s in zip(in_kimg, in_std)], profile(8, std)
        diff = lambda x: (sum(c * p(x) for c, p in zip(coefs[:, j], parts)) - target(x)) ** 2
        sq = sum(scipy.integrate.quad(diff, a, b, epsabs=0, epsrel=1e-9)[0] for a, b in [(0, 4), (4, 8)])
        norm = scipy.integrate.quad(lambda x: target(x) ** 2, 0, 8, epsabs=0, epsrel=1e-10)[0]
        assert errors[j] == pytest.approx(np.sqrt(sq / norm), rel=1e-5)


def test_parse_std_list_expands_ellipsis():
    stds = reconstruct_phema.parse_std_list('0.010,0.015,...,0.250')
    assert len(stds) == 49 and stds[:3] == [0.01, 0.015, 0.02] and stds[-1] == 0.25
    assert reconstruct_phema.parse_std_list('0.05, 0.1') == [0.05, 0.1]
    assert reconstruct_phema.parse_std_list('0.02,0.04,...,0.08,0.15') == [0.02, 0.04, 0.06, 0.08, 0.15]


@pytest.mark.parametrize(
    'text, message',
    [
        ('0.01,...,0.2', 'two values before'),
        ('0.010,0.015,...,0.252', 'not reached'),
        ('0.1,0.05,...,0.2', 'not reached'),
        ('0.05,abc', 'not a number'),
        ('0.05,0.35', 'wider'),
        ('0.0501,0.0502', 'same file name'),
        (',,', 'empty item'),
        ('0.05,,0.1', 'empty item'),
        ('0.05,', 'empty item'),
    ],
)
def test_parse_std_list_rejects_bad_lists(text, message):
    with pytest.raises(ValueError, match=message):
        reconstruct_phema.parse_std_list(text)


def run_cli(args: list[str]):
    result = CliRunner().invoke(reconstruct_phema.main, args)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)  # an error line, no traceback
    return result.output


def test_cli_errors_are_one_clear_line(run32, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    out = f'--outdir={tmp_path / "out"}'
    assert 'No snapshots named' in run_cli([f'--indir={empty}', out, '--outstd=0.1'])
    assert 'Input folder not found' in run_cli([f'--indir={tmp_path / "nope"}', out, '--outstd=0.1'])
    assert "'...' needs two values" in run_cli([f'--indir={run32}', out, '--outstd=0.05,...,0.1'])
    assert 'past the newest usable snapshot (kimg 32)' in run_cli(
        [f'--indir={run32}', out, '--outstd=0.1', '--outkimg=36']
    )
    assert not os.path.exists(tmp_path / 'out')
    (tmp_path / 'file').write_text('kept')
    assert 'is a file, not a folder' in run_cli([f'--indir={run32}', f'--outdir={tmp_path / "file"}', '--outstd=0.1'])
    assert (tmp_path / 'file').read_text() == 'kept'


def test_too_few_snapshots_is_refused(tmp_path):
    simulate_run(tmp_path, 1, steps_per_snapshot=200)  # one snapshot pair at kimg 2
    message = run_cli([f'--indir={tmp_path}', f'--outdir={tmp_path}', '--outstd=0.2'])
    assert 'Cannot reconstruct std 0.200 at kimg 2' in message and 'cannot form that profile' in message
    assert 'no snapshot lies in' in run_cli(
        [f'--indir={tmp_path}', f'--outdir={tmp_path}', '--outstd=0.1', '--outkimg=1']
    )
    in_pkls = reconstruct_phema.list_snapshots(str(tmp_path))
    assert len(list(reconstruct_phema.reconstruct_phema(in_pkls, [0.2], 2, max_error=0.5))) == 1


def test_mixed_architectures_name_both_files(tmp_path):
    simulate_run(tmp_path, 2, steps_per_snapshot=100)
    odd = str(tmp_path / snapshot_name('network-snapshot', 2, 0.1))
    save_network_pickle(dict(ema=Trajectory(width=2), encoder=None), odd)
    message = run_cli([f'--indir={tmp_path}', f'--outdir={tmp_path}', '--outstd=0.07'])
    assert 'different architectures' in message and odd in message
    assert str(tmp_path / snapshot_name('network-snapshot', 1, 0.05)) in message


@pytest.mark.parametrize(
    'args, message',
    [
        (['--outprefix=sub/phema'], "--outprefix='sub/phema': give the start of a file name"),
        (['--outprefix='], "--outprefix='': give the start of a file name"),
        (['--outprefix=network-snapshot', '--outdir={run}', '--overwrite'], 'give --outprefix another prefix'),
        (['--outstd=,,'], 'empty item'),
        (['--indir={file}'], 'is a file; name the folder of the training snapshots'),
        (['--run-dir={run}'], '--run-dir applies with --logger only'),
    ],
)
def test_a_bad_prefix_list_or_input_is_one_line_and_writes_nothing(run32, tmp_path, args, message):
    (tmp_path / 'file').write_text('kept')
    before = sorted(os.listdir(run32))
    args = [a.format(run=run32, file=tmp_path / 'file') for a in args]
    defaults = [f'--indir={run32}', f'--outdir={tmp_path / "out"}', '--outstd=0.1']
    given = {a.split('=')[0] for a in args}
    output = run_cli([*[a for a in defaults if a.split('=')[0] not in given], *args])
    lines = [line for line in output.splitlines() if line.startswith('Error')]
    assert len(lines) == 1 and message in lines[0] and 'Traceback' not in output, output
    assert sorted(os.listdir(tmp_path)) == ['file'] and sorted(os.listdir(run32)) == before
