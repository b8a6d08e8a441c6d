"""export_network.py and the .safetensors routes of the command-line tools: converted snapshots generate the images
their pickles generate, training writes both formats, and a pickle's notice is printed once and can be silenced."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error

import export_network
import generate_images
import train_edm2
from training.checkpoint import rng_state, save_checkpoint
from training.encoders import DiTVAEEncoder, StandardRGBEncoder
from training.network_loading import load_network
from training.networks_dit import DiT
from training.networks_edm2 import Precond
from training.snapshots import PickleWarning, classic_snapshot_name, load_network_pickle, save_network_pickle

pytestmark = pytest.mark.usefixtures('one_thread')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _net(seed: int) -> Precond:
    torch.manual_seed(seed)
    net = Precond(img_resolution=8, img_channels=3, label_dim=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[4], channels_per_head=8)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return net.eval().requires_grad_(False).to(torch.float16)


@pytest.fixture(scope='module')
def run(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp('run')
    for i, std in enumerate([0.05, 0.1]):
        save_network_pickle(dict(ema=_net(i), encoder=StandardRGBEncoder()), str(root / f'net-0000002-{std:.3f}.pkl'))
    return str(root)


def _images(tmp_path, *args: str) -> np.ndarray:
    npz = str(tmp_path / 'images.npz')
    result = CliRunner().invoke(
        generate_images.main, [*args, f'--npz={npz}', '--device=cpu', '--seeds=0-2', '--steps=4']
    )
    assert result.exit_code == 0, result.output
    return np.load(npz)['arr_0']


def test_converted_folder_generates_bitwise_the_images_of_its_pickles(run, tmp_path):
    result = CliRunner().invoke(export_network.main, ['safetensors', f'--net={run}'])
    assert result.exit_code == 0, result.output
    assert sorted(n for n in os.listdir(run) if n.endswith('.safetensors')) == [
        'net-0000002-0.050.safetensors',
        'net-0000002-0.100.safetensors',
    ]
    pkl, converted = f'{run}/net-0000002-0.050.pkl', f'{run}/net-0000002-0.050.safetensors'
    guided = ['--guidance=1.7', f'--gnet={run}/net-0000002-0.100.safetensors']
    expected = _images(tmp_path, f'--net={pkl}', '--gnet=' + pkl.replace('0.050', '0.100'), '--guidance=1.7')
    assert np.array_equal(_images(tmp_path, f'--net={converted}', *guided), expected) and expected.std() > 0


def test_export_refuses_dest_for_several_inputs_and_missing_files(run, tmp_path):
    result = CliRunner().invoke(export_network.main, ['safetensors', f'--net={run}', '--dest=x.safetensors'])
    assert_one_line_error(result, '--dest names one file', '2 snapshots')
    result = CliRunner().invoke(export_network.main, ['safetensors', f'--net={tmp_path}/missing.pkl'])
    assert_one_line_error(result, 'not found', 'missing.pkl')


def test_a_run_folders_classic_ema_snapshots_are_exported_too(tmp_path):
    names = ['net-0000002-0.050.pkl', classic_snapshot_name('net', 2, 0.9999)]
    for seed, name in enumerate(names):
        save_network_pickle(dict(ema=_net(seed), encoder=StandardRGBEncoder()), str(tmp_path / name))
    (tmp_path / 'log.txt').write_text('not a snapshot')
    result = CliRunner().invoke(export_network.main, ['safetensors', f'--net={tmp_path}'])
    assert result.exit_code == 0, result.output
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith('.safetensors')) == [
        'net-0000002-0.050.safetensors',
        'net-0000002-ema0.9999.safetensors',
    ]
    for name in names:
        exported = load_network_pickle(str(tmp_path / name).replace('.pkl', '.safetensors'))['ema'].state_dict()
        original = load_network_pickle(str(tmp_path / name))['ema'].state_dict()
        assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)


def test_a_dit_checkpoint_exports_to_the_denoiser_generation_loads_from_it(tmp_path):
    torch.manual_seed(0)
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=1, num_classes=5)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(std=0.1)
    torch.save(dit.state_dict(), tmp_path / 'tiny-dit.pt')
    result = CliRunner().invoke(export_network.main, ['safetensors', f'--net={tmp_path / "tiny-dit.pt"}'])
    assert result.exit_code == 0, result.output
    nets = [load_network(str(tmp_path / f'tiny-dit.{ext}'), torch.device('cpu')) for ext in ('pt', 'safetensors')]
    (net, encoder), (exported, exported_encoder) = nets
    assert isinstance(exported_encoder, DiTVAEEncoder) and exported_encoder.vae_name == encoder.vae_name
    x, labels = torch.randn(2, 4, 8, 8), torch.eye(5)[[1, 3]]
    with torch.no_grad():
        assert torch.equal(exported(x, 2.0, labels), net(x, 2.0, labels))
    assert all(torch.equal(exported.net.state_dict()[key], value) for key, value in dit.state_dict().items())
    from diffusers import DiTTransformer2DModel

    folder = tmp_path / 'tiny-dit-diffusers'  # the diffusers layout, named with a trailing slash
    DiTTransformer2DModel(num_attention_heads=1, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=1,
                          sample_size=8, patch_size=2, num_embeds_ada_norm=5).save_pretrained(folder / 'transformer')  # fmt: skip
    result = CliRunner().invoke(export_network.main, ['safetensors', f'--net={folder}{os.sep}'])
    assert result.exit_code == 0 and (tmp_path / 'tiny-dit-diffusers.safetensors').is_file(), result.output
    state = str(tmp_path / 'training-state-0000002.pt')
    save_checkpoint(state, dict(net={}, optimizer={}, ema={}, cur_nimg=0, loss_fn=None, rng=rng_state()))
    result = CliRunner().invoke(export_network.main, ['safetensors', f'--net={state}'])
    assert_one_line_error(result, 'is an edm2x training state', 'network-snapshot-*.pkl')


def test_training_writes_both_snapshot_formats_with_equal_weights(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    outdir = str(tmp_path / 'run')
    args = [f'--outdir={outdir}', '--preset=demo-tiny', '--workers=0', '--duration=512', '--snapshot=512']
    result = CliRunner().invoke(train_edm2.main, [*args, '--snapshot-format=both', '--checkpoint=512'])
    assert result.exit_code == 0, result.output
    name = os.path.join(outdir, 'network-snapshot-0000000-0.050')
    pickled, safe = load_network_pickle(f'{name}.pkl'), load_network_pickle(f'{name}.safetensors')
    expected, got = pickled['ema'].state_dict(), safe['ema'].state_dict()
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert got['unet.out_conv.weight'].dtype == torch.float16 and not safe['ema'].training
    assert (
        safe['dataset_kwargs'] == pickled['dataset_kwargs']
        and type(safe['loss_fn']).__name__ == type(pickled['loss_fn']).__name__
    )


def test_trust_pickles_flag_silences_the_notice(run, tmp_path):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        _images(tmp_path, f'--net={run}/net-0000002-0.050.pkl', '--trust-pickles')
    assert not [w for w in seen if issubclass(w.category, PickleWarning)]


def test_pickle_notice_is_printed_once_per_process(run, tmp_path):
    args = [f'--net={run}/net-0000002-0.050.pkl', f'--gnet={run}/net-0000002-0.100.pkl', '--guidance=2']
    cmd = [sys.executable, 'generate_images.py', *args, '--seeds=0', '--steps=2', f'--npz={tmp_path}/x.npz']
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    env.pop('EDM2X_TRUST_PICKLES', None)
    proc = subprocess.run([*cmd, '--device=cpu'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count('Loading a pickle runs the code inside it') == 1
    assert 'export_network.py safetensors' in proc.stderr


@pytest.mark.parametrize('dest', ['{pkl}', '{tmp}/net.pt', '{tmp}', '{tmp}/folder.safetensors', '{pkl}/x.safetensors'])
def test_a_dest_that_is_no_new_safetensors_file_is_refused_and_nothing_is_written(run, tmp_path, dest):
    (tmp_path / 'folder.safetensors').mkdir()
    pkl = f'{run}/net-0000002-0.050.pkl'
    before, dest = open(pkl, 'rb').read(), dest.format(pkl=pkl, tmp=tmp_path)
    result = CliRunner().invoke(export_network.main, ['safetensors', f'--net={pkl}', f'--dest={dest}'])
    assert_one_line_error(result, f'--dest={dest}')
    assert open(pkl, 'rb').read() == before and os.listdir(tmp_path) == ['folder.safetensors']
