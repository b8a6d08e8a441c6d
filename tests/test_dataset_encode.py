"""dataset_tool.py encode with a tiny random VAE, resume after an interruption, and the latent pipeline end to end:
pixels -> encode -> latent training -> generation decoded through the snapshot's encoder."""

import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error, training_config

import dataset_tool
from training import encoders, generation
from training.dataset import ImageFolderDataset
from training.training_loop import training_loop


@pytest.fixture(scope='module')
def pixels_zip(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp('pixels') / 'shapes.zip')
    dataset_tool.write_synthetic_dataset(path, resolution=8, num_images=9, seed=0, progress=False)
    return path


def run(*args: str):
    return CliRunner().invoke(dataset_tool.cli, ['encode', *args])


def test_encode_stores_posterior_statistics_with_labels_and_captions(tmp_path, vae_dir, pixels_zip):
    dest = tmp_path / 'latents.zip'
    result = run(
        f'--model-url={vae_dir}',
        f'--source={pixels_zip}',
        f'--dest={dest}',
        '--batch=4',
        '--max-images=7',
        '--device=cpu',
    )
    assert result.exit_code == 0, result.output
    assert not os.path.exists(f'{dest}.partial')

    source = ImageFolderDataset(pixels_zip, use_labels=True)
    latents = ImageFolderDataset(str(dest), use_labels=True)
    assert len(latents) == 7 and latents.image_shape == [8, 4, 4]
    stored = np.stack([latents[i][0] for i in range(7)])
    assert stored.dtype == np.float32
    # A second code path: the encoder on the whole batch at once, straight from the source dataset.
    expected = (
        encoders.StabilityVAEEncoder(vae_name=vae_dir)
        .encode_pixels(torch.from_numpy(np.stack([source[i][0] for i in range(7)])))
        .numpy()
    )
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-5)
    for i in range(7):
        assert np.array_equal(latents.get_label(i), source.get_label(i))
        assert latents.get_caption(i) == source.get_caption(i) != ''


def test_interrupted_encode_resumes_to_the_same_zip(tmp_path, vae_dir, pixels_zip, monkeypatch):
    args = [f'--model-url={vae_dir}', f'--source={pixels_zip}', '--batch=2', '--device=cpu']
    reference = tmp_path / 'reference.zip'
    assert run(*args, f'--dest={reference}').exit_code == 0

    # Interrupt during the third VAE call (items 0-3 finished), then lose item 3 as if killed mid-batch.
    dest = tmp_path / 'latents.zip'
    calls, interrupt_at = [], [3]
    encode_pixels = encoders.StabilityVAEEncoder.encode_pixels

    def interrupted(self, x):
        calls.append(len(x))
        if len(calls) in interrupt_at:
            raise KeyboardInterrupt
        return encode_pixels(self, x)

    monkeypatch.setattr(encoders.StabilityVAEEncoder, 'encode_pixels', interrupted)
    assert run(*args, f'--dest={dest}').exit_code != 0
    partial = f'{dest}.partial'
    assert not dest.exists() and os.path.isfile(os.path.join(partial, dataset_tool.item_relpath(3, 'npy')))
    os.remove(os.path.join(partial, dataset_tool.item_relpath(3, 'npy')))

    assert_one_line_error(run(*args, f'--dest={dest}'), partial, '--resume')
    assert_one_line_error(
        run(*args, f'--dest={dest}', '--resume', f'--model-url={tmp_path / "other"}'), partial, 'model_url'
    )
    assert_one_line_error(run(*args, f'--dest={dest}', '--resume', '--batch=3'), partial, 'batch 2, not 3')

    calls.clear()
    interrupt_at.clear()
    result = run(*args, f'--dest={dest}', '--resume')
    assert result.exit_code == 0, result.output
    assert calls == [2, 2, 2, 1]  # restarted at the batch of item 3: items 2-8
    assert dest.read_bytes() == reference.read_bytes()
    assert not os.path.exists(partial)


def test_encode_errors_are_one_line(tmp_path, pixels_zip):
    assert_one_line_error(
        run(f'--model-url={tmp_path / "missing"}', f'--source={pixels_zip}', f'--dest={tmp_path / "a.zip"}'),
        str(tmp_path / 'missing'),
        'save_pretrained',
    )
    assert_one_line_error(run(f'--source={tmp_path / "missing.zip"}', f'--dest={tmp_path / "a.zip"}'), 'missing.zip')


def test_encode_rejects_sizes_the_vae_cannot_halve(tmp_path, vae_dir):
    odd = str(tmp_path / 'odd.zip')
    dataset_tool.write_synthetic_dataset(odd, resolution=9, num_images=2, seed=0, progress=False)
    dest = tmp_path / 'a.zip'
    assert_one_line_error(run(f'--model-url={vae_dir}', f'--source={odd}', f'--dest={dest}'), '9x9', 'divisible by 2')
    assert not dest.exists() and not os.path.exists(f'{dest}.partial')


def test_latent_pipeline_from_pixels_to_generated_images(tmp_path, vae_dir, pixels_zip):
    latents = str(tmp_path / 'latents.zip')
    assert run(f'--model-url={vae_dir}', f'--source={pixels_zip}', f'--dest={latents}', '--device=cpu').exit_code == 0

    # train_edm2 picks the VAE encoder from the 8-channel data and sizes the net from the latents.
    c = training_config('demo-tiny', latents, vae=vae_dir)
    assert c.encoder_kwargs == dict(
        class_name='training.encoders.StabilityVAEEncoder', vae_name=os.path.abspath(vae_dir)
    )
    c.update(total_nimg=64, status_nimg=64, snapshot_nimg=64, checkpoint_nimg=None, sample_steps=4)
    run_dir = str(tmp_path / 'run')
    os.makedirs(run_dir)
    training_loop(run_dir=run_dir, device=torch.device('cpu'), **c)

    assert os.path.isfile(os.path.join(run_dir, 'samples-0000000.png'))  # the grid decodes through the VAE
    snapshot = os.path.join(run_dir, 'network-snapshot-0000000-0.050.pkl')
    assert os.path.getsize(snapshot) < os.path.getsize(os.path.join(vae_dir, 'diffusion_pytorch_model.safetensors')) * 4
    with open(snapshot, 'rb') as f:
        data = pickle.load(f)
    net, encoder = data['ema'], data['encoder']
    assert (net.img_channels, net.img_resolution) == (4, 4) and encoder.vae_name == vae_dir and encoder._vae is None

    batches = list(generation.generate_images(run_dir, seeds=[0, 1, 2], device='cpu', num_steps=4))
    images = torch.cat([b.images for b in batches])
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 8, 8)
    # Generation decodes through the pickled encoder: the same latents decoded by a fresh encoder agree.
    noise = torch.randn([1, 4, 4, 4], generator=torch.Generator().manual_seed(0))
    assert torch.equal(encoder.decode(noise), encoders.StabilityVAEEncoder(vae_name=vae_dir).decode(noise))
