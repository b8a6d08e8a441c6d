"""Tests for training/diffusers_export.py and training/diffusers_pipeline.py: an exported latent EDM2 net, loaded
by diffusers' DiffusionPipeline, makes the images generate_images.py makes for the same seeds."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error

import export_network
import generate_images
from training.diffusers_export import DiffusersExportError, export_diffusers
from training.encoders import StabilityVAEEncoder
from training.networks_edm2 import Precond
from training.networks_text import TextPrecond
from training.snapshots import save_network_pickle

pytestmark = pytest.mark.usefixtures('one_thread')


def _latent_net(seed: int, label_dim: int = 3) -> Precond:
    torch.manual_seed(seed)
    net = Precond(img_resolution=8, img_channels=4, label_dim=label_dim, model_channels=8, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[4], channels_per_head=8)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return net.eval().requires_grad_(False).to(torch.float16)  # as training writes snapshots


@pytest.fixture(scope='module')
def latent_pickles(tmp_path_factory, vae_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp('latent')
    paths = {}
    for name, net in dict(net=_latent_net(0), gnet=_latent_net(1)).items():
        paths[name] = str(root / f'{name}.pkl')
        encoder = StabilityVAEEncoder(vae_name=vae_dir, raw_mean=[0.1, -0.2, 0.3, 0], raw_std=[1, 2, 1, 0.5])
        save_network_pickle(dict(ema=net, encoder=encoder), paths[name])
    return paths


def _generated(tmp_path, *args: str) -> np.ndarray:
    npz = str(tmp_path / 'images.npz')
    result = CliRunner().invoke(generate_images.main, [*args, f'--npz={npz}', '--device=cpu', '--seeds=0-3'])
    assert result.exit_code == 0, result.output
    return np.load(npz)['arr_0']


@pytest.mark.parametrize('guided', [False, True])
def test_exported_pipeline_makes_the_images_generate_images_makes(tmp_path, latent_pickles, guided):
    from diffusers import AutoencoderKL, DiffusionPipeline

    folder = str(tmp_path / 'export')
    export_diffusers(latent_pickles['net'], folder, gnet=latent_pickles['gnet'] if guided else None)
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    assert type(pipe).__name__ == 'EDM2Pipeline' and isinstance(pipe.vae, AutoencoderKL)
    guide = [f'--gnet={latent_pickles["gnet"]}', '--guidance=1.8'] if guided else []
    got = pipe(seeds=range(4), class_labels=2, num_inference_steps=6, output_type='np', guidance=1.8 if guided else 1)
    expected = _generated(tmp_path, f'--net={latent_pickles["net"]}', '--steps=6', '--class=2', *guide)
    got = got.images
    assert got.shape == expected.shape == (4, 16, 16, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert expected.std() > 0 and not np.array_equal(expected[0], expected[1])


def test_random_classes_and_pil_output_follow_the_seeds(tmp_path, latent_pickles):
    from diffusers import DiffusionPipeline

    folder = str(tmp_path / 'export')
    export_diffusers(latent_pickles['net'], folder)
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    images = pipe(seeds=range(4), num_inference_steps=4).images
    expected = _generated(tmp_path, f'--net={latent_pickles["net"]}', '--steps=4')
    got = np.stack([np.asarray(image) for image in images])
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    index = json.load(open(os.path.join(folder, 'model_index.json')))
    assert index['guide'] == [None, None] and index['vae'] == ['diffusers', 'AutoencoderKL']


def test_text_nets_are_refused_in_one_line(tmp_path):
    path = str(tmp_path / 'text.pkl')
    torch.manual_seed(0)
    net = TextPrecond(img_resolution=8, img_channels=3, model_channels=8, channel_mult=[1], num_blocks=1,
                      attn_resolutions=[], text_length=8, text_channels=16, text_layers=1)  # fmt: skip
    save_network_pickle(dict(ema=net), path)
    with pytest.raises(DiffusersExportError, match='only EDM2 class or unconditional nets export'):
        export_diffusers(path, str(tmp_path / 'out'))
    result = CliRunner().invoke(export_network.main, ['diffusers', f'--net={path}', f'--dest={tmp_path / "out"}'])
    assert_one_line_error(result, 'TextPrecond')


def test_a_failed_export_leaves_no_folder_and_a_guide_of_other_images_is_refused(tmp_path, latent_pickles):
    broken = str(tmp_path / 'broken.pkl')
    missing_vae = StabilityVAEEncoder(vae_name=str(tmp_path / 'no-such-vae'))
    save_network_pickle(dict(ema=_latent_net(0), encoder=missing_vae), broken)
    dest = tmp_path / 'export'
    with pytest.raises(Exception, match='no-such-vae'):
        export_diffusers(broken, str(dest))  # the VAE fails to load after the denoiser was written
    assert not dest.exists() and os.listdir(tmp_path) == ['broken.pkl']
    wide = Precond(img_resolution=16, img_channels=4, label_dim=3, model_channels=8, channel_mult=[1], num_blocks=1,
                   attn_resolutions=[])  # fmt: skip
    save_network_pickle(dict(ema=wide, encoder=StabilityVAEEncoder(vae_name=str(tmp_path))), str(tmp_path / 'w.pkl'))
    with pytest.raises(DiffusersExportError, match='guiding network makes 4x16x16 images with 3 classes'):
        export_diffusers(latent_pickles['net'], str(dest), gnet=str(tmp_path / 'w.pkl'))
    assert not dest.exists()
