import pickle
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import persistence
from training.encoders import StabilityVAEEncoder, hub_reachable, load_vae

RAW_MEAN = np.array([5.81, 3.25, 0.12, -2.15])
RAW_STD = np.array([4.17, 4.62, 3.71, 3.28])


def pixels(n: int, resolution: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, [n, 3, resolution, resolution], generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def test_encode_pixels_stores_float32_posterior_mean_and_std_of_x_over_255(vae_dir):
    encoder = StabilityVAEEncoder(vae_name=vae_dir, batch_size=3)  # 5 images: batches of 3 and 2
    x = pixels(5)
    stored = encoder.encode_pixels(x)
    assert stored.dtype == torch.float32 and stored.shape == (5, 8, 4, 4)

    # Independently: the encoder's moments, split into mean and log-variance, whole batch at once.
    vae = load_vae(vae_dir)
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(x.double().div(255).float()))
    mean, logvar = moments.chunk(2, dim=1)
    std = (0.5 * logvar.clamp(-30, 20)).exp()
    torch.testing.assert_close(stored[:, :4], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stored[:, 4:], std, rtol=1e-5, atol=1e-5)
    assert (stored[:, 4:] > 0).all()


def test_normalisation_inverts_exactly_for_posterior_mean(vae_dir):
    encoder = StabilityVAEEncoder(vae_name=vae_dir)
    mean = encoder.encode_pixels(pixels(4))[:, :4]
    stored = torch.cat([mean, torch.zeros_like(mean)], dim=1)  # std zeroed: no sampling noise
    latents = encoder.encode_latents(stored)

    expected = (mean.double() - torch.tensor(RAW_MEAN).view(1, 4, 1, 1)) * (
        0.5 / torch.tensor(RAW_STD).view(1, 4, 1, 1)
    )
    torch.testing.assert_close(latents.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(encoder.latents_to_vae(latents), mean, rtol=1e-6, atol=1e-6)

    # decode feeds the VAE exactly that inverse, then clamps, scales by 255 and rounds.
    seen = []
    vae_decode = encoder._vae.decode
    encoder._vae.decode = lambda z: seen.append(z) or vae_decode(z)
    images = encoder.decode(latents)
    torch.testing.assert_close(torch.cat(seen), mean, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        reference = load_vae(vae_dir).decode(mean).sample.double().clamp(0, 1).mul(255).round()
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
    assert (images.double() - reference).abs().max() <= 1


def test_encode_latents_samples_mean_plus_std_noise():
    encoder = StabilityVAEEncoder(vae_name='unused/never-loaded')
    mean, std = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([0.5, 2.0, 1.0, 0.1])
    stored = torch.cat([mean.view(1, 4, 1, 1).expand(64, 4, 8, 8), std.view(1, 4, 1, 1).expand(64, 4, 8, 8)], dim=1)
    torch.manual_seed(0)
    latents = encoder.encode_latents(stored).double()
    got_mean, got_std = latents.mean(dim=[0, 2, 3]).numpy(), latents.std(dim=[0, 2, 3]).numpy()
    np.testing.assert_allclose(got_mean, (mean.numpy() - RAW_MEAN) * 0.5 / RAW_STD, atol=4 * 0.5 * 2 / 4.62 / 64)
    np.testing.assert_allclose(got_std, std.numpy() * 0.5 / RAW_STD, rtol=0.05)


def test_pickle_keeps_vae_name_not_weights(vae_dir):
    encoder = StabilityVAEEncoder(vae_name=vae_dir)
    encoder.init('cpu')
    weight_bytes = sum(p.numel() * p.element_size() for p in encoder._vae.parameters())
    data = pickle.dumps(encoder)
    assert len(data) < weight_bytes / 4
    restored = pickle.loads(data)
    assert persistence.is_persistent(restored) and restored._vae is None and restored.vae_name == vae_dir
    latents = torch.randn([2, 4, 4, 4], generator=torch.Generator().manual_seed(1))
    assert torch.equal(restored.decode(latents), encoder.decode(latents))
    assert encoder._vae is not None  # pickling left the live encoder intact


def test_missing_vae_fails_with_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    with pytest.raises(dnnlib.util.DownloadError) as info:
        StabilityVAEEncoder(vae_name='stabilityai/sd-vae-ft-mse').init('cpu')
    message = str(info.value)
    assert '\n' not in message and 'huggingface-cli download stabilityai/sd-vae-ft-mse' in message
    assert str(tmp_path / 'cache' / 'diffusers') in message and 'save_pretrained' in message

    for bad in [str(tmp_path / 'no-such-folder'), str(tmp_path)]:  # missing, and a folder without a VAE
        with pytest.raises(dnnlib.util.DownloadError) as info:
            load_vae(bad)
        assert '\n' not in str(info.value) and bad in str(info.value)


def test_an_uncached_hub_vae_is_asked_of_the_hub_only_when_its_host_answers(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL
    from huggingface_hub import constants

    for name in ('HF_HUB_OFFLINE', 'HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy', 'NO_PROXY', 'no_proxy'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    attempts = []  # local_files_only of each load: True reads the cache, False asks the hub

    def from_pretrained(name, local_files_only, **kwargs):
        attempts.append(local_files_only)
        raise OSError(f'{name} is not there')

    monkeypatch.setattr(AutoencoderKL, 'from_pretrained', from_pretrained)
    with socket.socket() as host:  # a host that answers
        host.bind(('127.0.0.1', 0))
        host.listen()
        monkeypatch.setattr(constants, 'ENDPOINT', f'http://127.0.0.1:{host.getsockname()[1]}')
        with pytest.raises(dnnlib.util.DownloadError):
            load_vae('stabilityai/sd-vae-ft-mse')
        assert attempts == [True, False]
    attempts.clear()  # closed now: nothing answers at that port, as offline
    with pytest.raises(dnnlib.util.DownloadError) as info:
        load_vae('stabilityai/sd-vae-ft-mse')
    assert attempts == [True]
    assert '\n' not in str(info.value) and 'huggingface-cli download stabilityai/sd-vae-ft-mse' in str(info.value)
    attempts.clear()  # behind a proxy the hub is asked all the same: the proxy decides
    monkeypatch.setenv('https_proxy', 'http://proxy.invalid:3128')
    with pytest.raises(dnnlib.util.DownloadError):
        load_vae('stabilityai/sd-vae-ft-mse')
    assert attempts == [True, False]


def test_the_hub_probe_gives_up_on_a_name_lookup_that_hangs(monkeypatch):
    # getaddrinfo has no timeout of its own: without network it can hang far longer than the probe's 3 s.
    monkeypatch.setattr(urllib.request, 'getproxies', dict)
    released = threading.Event()

    def slow_lookup(*args, **kwargs):
        released.wait(30)
        raise socket.gaierror('no answer')

    monkeypatch.setattr(socket, 'getaddrinfo', slow_lookup)
    start = time.monotonic()
    try:
        assert hub_reachable(timeout=0.5) is False
        assert time.monotonic() - start < 15  # well short of the 30 s lookup
    finally:
        released.set()


def test_the_hub_probe_does_not_wait_out_its_timeout_when_the_lookup_fails_at_once(monkeypatch):
    monkeypatch.setattr(urllib.request, 'getproxies', dict)

    def no_such_host(*args, **kwargs):
        raise socket.gaierror('no such host')

    monkeypatch.setattr(socket, 'getaddrinfo', no_such_host)
    start = time.monotonic()
    assert hub_reachable(timeout=30) is False
    assert time.monotonic() - start < 15  # well short of the 30 s bound


def test_the_hub_probe_answers_true_when_the_looked_up_host_takes_the_connection(monkeypatch):
    monkeypatch.setattr(urllib.request, 'getproxies', dict)
    with socket.socket() as host:
        host.bind(('127.0.0.1', 0))
        host.listen()
        address = [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, '', host.getsockname())]
        monkeypatch.setattr(socket, 'getaddrinfo', lambda *args, **kwargs: address)
        assert hub_reachable() is True
