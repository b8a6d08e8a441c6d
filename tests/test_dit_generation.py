"""DiT's released models in generate_images.py and calculate_metrics.py gen: tiny random DiTs saved in the published
layouts (a plain state dict, a diffusers folder), DiT's DDPM sampling and guidance against a step-by-step
reference, every sampler's batch invariance, and bad input."""

import os
import pickle
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error
from test_calculate_metrics import _FakeScriptInception, _ScriptPickle
from test_generate_images import tiny_precond

import calculate_metrics
import generate_images
from training.checkpoint import rng_state, save_checkpoint
from training.dit_checkpoints import dit_state_dict_from_diffusers, load_dit_checkpoint
from training.dit_release import diffusion_from_scheduler_config, load_dit_network
from training.encoders import DiTVAEEncoder, StandardRGBEncoder
from training.generation import generate_images as generate
from training.generation import load_network, sample
from training.loss import EDM2Loss
from training.networks_dit import DiT
from training.snapshots import save_network_pickle

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=1, num_classes=5)


def tiny_dit(seed: int = 0) -> DiT:
    """Random weights everywhere (adaLN-Zero's zeros would make every output 0)."""
    torch.manual_seed(seed)
    net = DiT(**TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(std=0.1)
    return net.eval()


def diffusers_dit(seed: int = 1) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    ref = DiTTransformer2DModel(
        num_attention_heads=1,
        attention_head_dim=64,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=5,
        norm_eps=1e-6,
    )
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(std=0.1)
        for block in ref.transformer_blocks:  # DiT holds one conditioning embedder, diffusers one per block.
            block.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
    return ref


@pytest.fixture(scope='module')
def dits(tmp_path_factory, vae_dir) -> dict[str, str]:
    from diffusers import DDIMScheduler

    root = tmp_path_factory.mktemp('dit')
    paths = {name: str(root / f'{name}.pt') for name in ('pt', 'same-as-folder', 'bad', 'out')}
    torch.save(tiny_dit().state_dict(), paths['pt'])
    ref = diffusers_dit()
    paths['folder'] = str(root / 'DiT-tiny-diffusers')
    ref.save_pretrained(os.path.join(paths['folder'], 'transformer'))
    # The hub's DiT folders hold a DDIMScheduler config, which names no variance: the net's 8 outputs say learned.
    DDIMScheduler().save_pretrained(os.path.join(paths['folder'], 'scheduler'))
    shutil.copytree(vae_dir, os.path.join(paths['folder'], 'vae'))
    state = dit_state_dict_from_diffusers(ref.state_dict(), input_size=8)
    torch.save(load_dit_checkpoint(state).state_dict(), paths['same-as-folder'])
    torch.save({'encoder.weight': torch.zeros(3)}, paths['bad'])
    paths['state'] = str(root / 'training-state-0000128.pt')  # what training_loop saves, small
    save_checkpoint(paths['state'], dict(net={}, optimizer={}, ema={}, cur_nimg=0, loss_fn=EDM2Loss(), rng=rng_state()))
    paths['pixel-net'] = str(root / 'pixel-net.pkl')
    save_network_pickle({'ema': tiny_precond(0), 'encoder': StandardRGBEncoder()}, paths['pixel-net'])
    paths['vae'] = vae_dir
    return paths


def run_cli(*args: str) -> None:
    result = CliRunner().invoke(generate_images.main, ['--device=cpu', *args])
    assert result.exit_code == 0, result.output


def read_pngs(folder) -> dict[str, np.ndarray]:
    return {name: np.asarray(PIL.Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}


def test_released_layouts_load_on_dits_ddpm_process_with_dits_decoder(dits):
    net, encoder = load_network(dits['pt'], torch.device('cpu'))
    assert (net.img_resolution, net.img_channels, net.label_dim) == (8, 4, 5)
    np.testing.assert_allclose(net.diffusion.betas.numpy(), np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
    assert (net.diffusion.prediction, net.diffusion.variance) == ('eps', 'learned_range')
    assert isinstance(encoder, DiTVAEEncoder) and encoder.vae_name == 'stabilityai/sd-vae-ft-ema'
    assert encoder.scale == 0.18215
    folder_net, folder_encoder = load_network(dits['folder'], torch.device('cpu'))
    assert folder_encoder.vae_name == os.path.join(dits['folder'], 'vae')
    np.testing.assert_allclose(folder_net.diffusion.betas.numpy(), np.linspace(1e-4, 0.02, 1000), rtol=1e-6)
    assert folder_net.diffusion.variance == 'learned_range'
    same = load_dit_network(dits['same-as-folder'])[0].net.state_dict()
    assert all(torch.equal(value, same[key]) for key, value in folder_net.net.state_dict().items())


@torch.no_grad()
def test_dit_ddpm_with_guidance_equals_a_step_by_step_reference(dits):
    net, _ = load_network(dits['pt'], torch.device('cpu'))
    dit, w, seeds, classes = net.net, 1.5, [3, 11], [1, 4]
    out = sample(net, seeds, classes, guidance=w, sampler='ddpm', num_steps=4).latents

    # Improved DDPM's respacing of 1000 steps into 4 keeps 0, 333, 666, 999; learned-range variance; guidance by the
    # null label (index 5) on the first 3 ε channels (Peebles & Xie's sampler).
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    kept = [0, 333, 666, 999]
    a = abar[kept]
    a_prev = np.concatenate([[1.0], a[:-1]])
    beta = 1 - a / a_prev
    post_var = beta * (1 - a_prev) / (1 - a)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn([4, 8, 8], generator=g) for g in gens]).double()
    for i in reversed(range(4)):
        t = torch.full([2], kept[i])
        c = dit(x.float(), t, torch.tensor(classes)).double()
        u = dit(x.float(), t, torch.tensor([5, 5])).double()
        eps = torch.cat([u[:, :3] + w * (c[:, :3] - u[:, :3]), c[:, 3:4]], dim=1)
        x0 = (x - (1 - a[i]) ** 0.5 * eps) / a[i] ** 0.5
        mean = a_prev[i] ** 0.5 * beta[i] / (1 - a[i]) * x0 + (1 - beta[i]) ** 0.5 * (1 - a_prev[i]) / (1 - a[i]) * x
        frac = (c[:, 4:] + 1) / 2
        log_var = frac * np.log(beta[i]) + (1 - frac) * np.log(post_var[max(i, 1)])
        x = mean
        if i > 0:
            x = x + (0.5 * log_var).exp() * torch.stack([torch.randn([4, 8, 8], generator=g) for g in gens])
    torch.testing.assert_close(out.double(), x, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_dit_under_the_edm_sampler_spans_its_own_sigma_range_and_guides_by_the_null_label(dits):
    # One EDM step from the net's σ_max lands on the guided denoiser: D_null + w·(D − D_null).
    net, _ = load_network(dits['pt'], torch.device('cpu'))
    out = sample(net, [7], [2], guidance=2.0, num_steps=1).latents
    x = torch.randn([1, 4, 8, 8], generator=torch.Generator().manual_seed(7)) * net.sigma_max
    d, d_null = net(x, net.sigma_max, torch.eye(5)[[2]]), net(x, net.sigma_max, torch.zeros([1, 5]))
    torch.testing.assert_close(out, d_null + 2.0 * (d - d_null), rtol=1e-4, atol=1e-4)
    assert net.sigma_max == pytest.approx(((1 - 4.036e-5) / 4.036e-5) ** 0.5, rel=1e-3)  # σ of ᾱ_999, linear β


@pytest.mark.parametrize('net', ['dit', 'edm'])
@pytest.mark.parametrize('sampler', ['edm', 'ddpm', 'ddim'])
def test_every_sampler_gives_the_same_pngs_for_any_batch_size(dits, tmp_path, net, sampler):
    args = (
        [f'--net={dits["pt"]}', f'--vae={dits["vae"]}', '--guidance=1.5']
        if net == 'dit'
        else [f'--net={dits["pixel-net"]}']
    )
    args += ['--seeds=0-7', '--steps=3', f'--sampler={sampler}', *(['--eta=0.5'] if sampler == 'ddim' else [])]
    for batch in (1, 7):
        run_cli(*args, f'--batch={batch}', f'--outdir={tmp_path / str(batch)}')
    b1, b7 = read_pngs(tmp_path / '1'), read_pngs(tmp_path / '7')
    assert sorted(b1) == [f'{seed:06d}.png' for seed in range(8)] and sorted(b7) == sorted(b1)
    # Per-seed draws make the images equal; float sums whose order depends on the batch (matrix products) may
    # move a rare pixel across a rounding boundary, as in test_generate_images.
    diffs = np.stack([np.abs(b1[name].astype(int) - b7[name]) for name in b1])
    assert diffs.max() <= 1 and (diffs > 0).mean() < 1e-3
    assert len({image.tobytes() for image in b1.values()}) == 8


def test_precision_option_runs_a_released_dit_in_bf16_close_to_fp32():
    from training.dit_release import dit_network
    from training.precision import prepare_for_sampling

    net = dit_network(tiny_dit())
    dtypes = set()
    for m in net.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    x, sigma, labels = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 0.5]), torch.eye(5)[[0, 3]]
    out = {}
    for precision in ('fp32', 'bf16'):
        prepare_for_sampling(net, precision)
        dtypes.clear()
        with torch.no_grad():
            out[precision] = net(x, sigma, labels)
        assert dtypes == {torch.float32 if precision == 'fp32' else torch.bfloat16}
    assert out['bf16'].dtype == torch.float32
    error = (out['bf16'] - out['fp32']).norm() / out['fp32'].norm()
    assert 0 < error < 0.02, error  # bf16 rounding, and not the float32 result


def test_diffusers_folder_gives_the_images_of_the_same_weights_as_a_state_dict(dits):
    kwargs = dict(seeds=[0, 1], device='cpu', num_steps=2, sampler='ddim', guidance=1.5)
    (folder,) = generate(dits['folder'], **kwargs)
    (state_dict,) = generate(dits['same-as-folder'], vae=os.path.join(dits['folder'], 'vae'), **kwargs)
    assert folder.images.shape == (2, 3, 16, 16) and torch.equal(folder.images, state_dict.images)


def test_calculate_metrics_gen_runs_on_a_dit_checkpoint(dits, tmp_path, monkeypatch):
    detectors = tmp_path / 'detectors'
    detectors.mkdir()
    torch.jit.script(_FakeScriptInception()).save(str(detectors / 'fake.pt'))
    with open(detectors / 'inception-2015-12-05.pkl', 'wb') as f:
        pickle.dump(_ScriptPickle(str(detectors / 'fake.pt')), f)
    (tmp_path / 'images').mkdir()
    for i in range(4):
        image = np.random.default_rng(i).integers(0, 256, [16, 16, 3], dtype=np.uint8)
        PIL.Image.fromarray(image).save(tmp_path / 'images' / f'{i}.png')
    monkeypatch.setenv('EDM2X_DETECTORS', str(detectors))
    common = ['--metrics=fid', '--device=cpu', '--batch=2']
    ref = str(tmp_path / 'ref.pkl')
    runner = CliRunner()
    result = runner.invoke(calculate_metrics.cli, ['ref', f'--data={tmp_path / "images"}', f'--dest={ref}', *common])
    assert result.exit_code == 0, result.output
    args = ['gen', f'--net={dits["pt"]}', f'--vae={dits["vae"]}', f'--ref={ref}', '--num=3', '--steps=2']
    result = runner.invoke(calculate_metrics.cli, [*args, '--sampler=ddpm', '--guidance=1.5', *common])
    assert result.exit_code == 0, result.output
    assert float(next(line for line in result.stdout.splitlines() if line.startswith('fid ')).split()[1]) > 0


@pytest.mark.parametrize(
    'args, fragments',
    [
        (['--net={pt}', '--sampler=ddpm', '--respacing=ddim7x'], ["'ddim7x'", 'step count']),
        (['--net={pt}', '--sampler=ddim', '--respacing=10,abc'], ["'10,abc'", 'positive step counts']),
        (['--net={pt}', '--sampler=heun'], ["'heun'", 'edm, ddpm, ddim']),
        (['--net={pixel-net}', '--sampler=ddim', '--vp-schedule=quadratic'], ["'quadratic'", 'cosine']),
        (['--net={pt}', '--sampler=ddim', '--vp-schedule=cosine'], ['--vp-schedule applies to EDM nets only']),
        (['--net={pt}', '--sampler=ddpm', '--S_churn=5', '--eta=0.5'], ['--S_churn applies to --sampler=edm only']),
        (['--net={bad}'], ['bad.pt', 'neither an edm2x network pickle nor a DiT checkpoint']),
        (['--net={state}'], ['training-state-0000128.pt is an edm2x training state', 'network-snapshot-*.pkl']),
        (['--net={pixel-net}', '--vae={vae}'], ['--vae', 'makes pixels']),
        (['--net={pt}', '--vae=stabilityai/no-such-vae'], ['stabilityai/no-such-vae', '--cache-dir']),
        (['--net=http://127.0.0.1:9/DiT-XL-2-256x256.pt'], ['DiT-XL-2-256x256.pt', 'place the file by hand at']),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(dits, tmp_path, monkeypatch, args, fragments):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    args = [arg.format(**dits) for arg in args]
    result = CliRunner().invoke(generate_images.main, ['--device=cpu', *args, f'--outdir={tmp_path / "out"}'])
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


def test_scheduler_configs_give_their_schedules_predictions_and_variances():
    config = dict(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012, prediction_type='v_prediction')
    d = diffusion_from_scheduler_config(dict(config, variance_type='fixed_small_log'), learn_sigma=False)
    np.testing.assert_allclose(d.betas.numpy(), np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, rtol=1e-12)
    assert (d.prediction, d.variance) == ('v', 'fixed_small')
    assert diffusion_from_scheduler_config(config, learn_sigma=True).variance == 'learned_range'
    assert diffusion_from_scheduler_config({}, learn_sigma=False).variance == 'fixed_large'  # DiT without learned σ
    with pytest.raises(ValueError, match="'sigmoid'"):
        diffusion_from_scheduler_config(dict(beta_schedule='sigmoid'))
