"""Tests for training/api.py (the `edm2x` package): the README's example runs, and the API makes what the
command-line tools make (same images for the same seeds, same post-hoc EMA weights, same FID)."""

import os
import pickle
import runpy

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_calculate_metrics import _FakeScriptInception, _ScriptPickle

import edm2x
import generate_images
import reconstruct_phema
from training.encoders import StandardRGBEncoder
from training.generation import GenerationError
from training.metrics import calculate_metrics_from_stats, calculate_stats_for_iterable, load_stats, save_stats
from training.networks_edm2 import Precond
from training.snapshots import load_network_pickle, save_network_pickle, snapshot_name

pytestmark = [
    pytest.mark.usefixtures('one_thread'),
    pytest.mark.filterwarnings('ignore:`torch.jit.:DeprecationWarning'),
]

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'api_example.py')


def _net(seed: int) -> Precond:
    torch.manual_seed(seed)
    net = Precond(img_resolution=8, img_channels=3, label_dim=3, use_fp16=False, model_channels=8, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[4], channels_per_head=8)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope='module')
def demo(tmp_path_factory) -> str:
    """A folder laid out as the example expects: runs/demo with snapshots at 2 stds and 2 times, refs/demo.pkl, and
    stand-in detectors under detectors/."""
    root = tmp_path_factory.mktemp('demo')
    run = root / 'runs' / 'demo'
    run.mkdir(parents=True)
    for i, (kimg, std) in enumerate([(1, 0.05), (1, 0.1), (2, 0.05), (2, 0.1)]):
        data = dict(ema=_net(i), encoder=StandardRGBEncoder(), dataset_kwargs=dict(path='x'))
        save_network_pickle(data, str(run / snapshot_name('network-snapshot', kimg, std)))
    (root / 'detectors').mkdir()
    torch.jit.script(_FakeScriptInception()).save(str(root / 'detectors' / 'fake.pt'))
    with open(root / 'detectors' / 'inception-2015-12-05.pkl', 'wb') as f:
        pickle.dump(_ScriptPickle(str(root / 'detectors' / 'fake.pt')), f)
    (root / 'refs').mkdir()
    images = [torch.randint(0, 256, [16, 3, 8, 8], dtype=torch.uint8, generator=torch.Generator().manual_seed(0))]
    save_stats(calculate_stats_for_iterable(images, ['fid'], detector_source=str(root / 'detectors'), verbose=False),
               str(root / 'refs' / 'demo.pkl'))  # fmt: skip
    return str(root)


def test_readme_example_runs(demo, monkeypatch, capsys):
    monkeypatch.chdir(demo)
    monkeypatch.setenv('EDM2X_DETECTORS', os.path.join(demo, 'detectors'))
    runpy.run_path(EXAMPLE, run_name='__main__')
    out = capsys.readouterr().out
    assert '(8, 8, 8, 3)' in out and float(out.split('FID')[1]) > 0
    assert os.path.isfile(os.path.join(demo, 'api-seed0.png'))


def test_sample_makes_the_images_generate_images_makes(demo, tmp_path):
    net = edm2x.load(os.path.join(demo, 'runs', 'demo'), device='cpu')
    got = net.sample(seeds=[3, 1, 4], labels=2, guidance=1, solver='heun', num_steps=5)
    npz = str(tmp_path / 'x.npz')
    args = [f'--net={demo}/runs/demo', '--seeds=3,1,4', '--class=2', '--steps=5', f'--npz={npz}', '--device=cpu']
    result = CliRunner().invoke(generate_images.main, args)
    assert result.exit_code == 0, result.output
    assert got.dtype == np.uint8 and np.array_equal(got, np.load(npz)['arr_0']) and got.std() > 0
    pil = net.sample(seeds=[3], labels=2, num_steps=5, output='pil')[0]
    assert np.array_equal(np.asarray(pil), got[0])


def test_a_presets_churn_is_dropped_when_sample_picks_another_solver(demo, monkeypatch):
    monkeypatch.chdir(demo)  # The demo preset's net is runs/demo; its sampler settings hold S_churn=10.
    net = edm2x.load('demo', device='cpu')
    got = net.sample(seeds=[3, 1], labels=2, guidance=1, solver='dpm++2m', num_steps=4)
    assert np.array_equal(got, net.sample(seeds=[3, 1], labels=2, guidance=1, solver='dpm++2m', num_steps=4, S_churn=0))
    with pytest.raises(GenerationError, match='heun solver only'):
        net.sample(seeds=[3], labels=2, guidance=1, solver='dpm++2m', num_steps=4, S_churn=5)


def test_sample_refuses_settings_its_sampler_would_not_read(demo):
    net = edm2x.load(os.path.join(demo, 'runs', 'demo'), device='cpu')
    with pytest.raises(GenerationError, match='--eta applies to --sampler=ddim only, not to --sampler=edm'):
        net.sample(seeds=[3], labels=2, num_steps=4, eta=0.5)
    with pytest.raises(GenerationError, match='--S_noise applies with churn only'):
        net.sample(seeds=[3], labels=2, num_steps=4, S_noise=1.01)


def test_reconstruct_gives_the_weights_reconstruct_phema_writes(demo, tmp_path):
    ema = edm2x.reconstruct(os.path.join(demo, 'runs', 'demo'), std=0.08)
    args = [f'--indir={demo}/runs/demo', f'--outdir={tmp_path}', '--outstd=0.08']
    assert CliRunner().invoke(reconstruct_phema.main, args).exit_code == 0
    expected = load_network_pickle(str(tmp_path / snapshot_name('phema', 2, 0.08)))['ema'].state_dict()
    got = ema.net.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not torch.equal(got['unet.out_conv.weight'], _net(2).state_dict()['unet.out_conv.weight'])


def test_fid_equals_the_metric_of_the_sampled_images(demo):
    net = edm2x.load(os.path.join(demo, 'runs', 'demo'), device='cpu')
    detectors = os.path.join(demo, 'detectors')
    images = net.sample(seeds=range(5, 11), num_steps=4, output='torch')
    stats = calculate_stats_for_iterable([images], ['fid'], detector_source=detectors, verbose=False)
    expected = calculate_metrics_from_stats(stats, load_stats(os.path.join(demo, 'refs', 'demo.pkl')), ['fid'])['fid']
    got = edm2x.fid(net, os.path.join(demo, 'refs', 'demo.pkl'), num=6, seed=5, detectors=detectors, num_steps=4)
    assert got == pytest.approx(expected, rel=1e-6)
