"""End-to-end checks of generate_images.py: NVIDIA-format pickles against a reference sampler, batch and
rank invariance, guidance, output formats, presets and bad input."""

import os
import pickle
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate_images
from torch_utils import persistence
from training import generation, sampler_options
from training.encoders import StandardRGBEncoder
from training.networks_edm2 import Precond
from training.snapshots import save_network_pickle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_precond(seed: int, label_dim: int = 3, img_resolution: int = 8, **kwargs) -> Precond:
    torch.manual_seed(seed)
    net = Precond(
        **kwargs,
        img_resolution=img_resolution,
        img_channels=3,
        label_dim=label_dim,
        use_fp16=False,
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
    )
    # Fresh nets have zero output gains; give the U-Net a non-trivial output so that tests can fail.
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith('gain'):
                p.fill_(0.5)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope='module')
def pickles(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp('nets')
    nets = dict(net=tiny_precond(0), uncond=tiny_precond(1, label_dim=0), res16=tiny_precond(2, img_resolution=16))
    paths = {}
    for name, net in nets.items():
        paths[name] = str(root / f'{name}.pkl')
        save_network_pickle({'ema': net, 'encoder': StandardRGBEncoder()}, paths[name])
    paths['not-network'] = str(root / 'not-network.pkl')
    with open(paths['not-network'], 'wb') as f:
        pickle.dump({'loss': 1.0}, f)
    paths['ema-not-module'] = str(root / 'ema-not-module.pkl')
    with open(paths['ema-not-module'], 'wb') as f:
        pickle.dump({'ema': 'weights'}, f)
    paths['garbage'] = str(root / 'garbage.pkl')
    with open(paths['garbage'], 'wb') as f:
        f.write(b'this is not a pickle')
    return paths


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(generate_images.main, ['--device=cpu', *args])
    assert result.exit_code == 0, result.output
    return result.output


def read_pngs(folder: str) -> dict[str, np.ndarray]:
    return {name: np.asarray(PIL.Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}


# ----------------------------------------------------------------------------
# Acceptance 1: a pickle in NVIDIA's persistence format, built by hand, against a reference sampler.

NVIDIA_STYLE_SRC = """
import numpy as np
import torch
import dnnlib
from torch_utils import persistence
from torch_utils import misc

@persistence.persistent_class
class TinyPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, sigma_data=0.5):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.sigma_data = sigma_data
        self.conv = torch.nn.Conv2d(img_channels + 1, img_channels, 3, padding=1)
        self.emb_label = torch.nn.Linear(label_dim, img_channels, bias=False)
        self.emb_noise = torch.nn.Linear(1, img_channels)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **unet_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4
        emb = self.emb_label(class_labels) + self.emb_noise(c_noise.reshape(-1, 1))
        ones = misc.const_like(x, 1, shape=[x.shape[0], 1, x.shape[2], x.shape[3]])
        F_x = torch.tanh(self.conv(torch.cat([c_in * x, ones], dim=1)) + emb.reshape(-1, self.img_channels, 1, 1))
        return c_skip * x + c_out * F_x

@persistence.persistent_class
class TinyEncoder:
    def __init__(self):
        super().__init__()
    def init(self, device):
        pass
    def encode_latents(self, x):
        return x.to(torch.float32) / 127.5 - 1
    def decode(self, x):
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)
"""


class _HandBuiltPersistent:
    """Pickles as NVIDIA's persistence does: a call to _reconstruct_persistent_obj(meta)."""

    def __init__(self, obj: object, class_name: str, init_args: tuple) -> None:
        state = dict(obj.__dict__, _init_args=init_args, _init_kwargs={})
        self.meta = dict(type='class', version=6, module_src=NVIDIA_STYLE_SRC, class_name=class_name, state=state)

    def __reduce__(self):
        return persistence._reconstruct_persistent_obj, (self.meta,)


def reference_sample(net, encoder, seed: int, num_steps: int, S_churn: float, S_min: float, S_max: float) -> np.ndarray:
    """EDM Alg. 2 for one image, written out step by step; draws in EDM2's order (noise, class, churn)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn([1, net.img_channels, net.img_resolution, net.img_resolution], generator=gen)
    label = torch.nn.functional.one_hot(torch.randint(net.label_dim, [1], generator=gen), net.label_dim)
    sigmas = [
        (80 ** (1 / 7) + i / (num_steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(num_steps)
    ] + [0]
    x = x * sigmas[0]
    for i in range(num_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / num_steps, 2**0.5 - 1) if S_min <= s <= S_max else 0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + (s_hat**2 - s**2) ** 0.5 * torch.randn(x.shape[1:], generator=gen)[None]
        slope = (x - net(x, torch.tensor([s_hat]), label)) / s_hat
        x_euler = x + (s_next - s_hat) * slope
        if s_next > 0:
            slope_next = (x_euler - net(x_euler, torch.tensor([s_next]), label)) / s_next
            x_euler = x + (s_next - s_hat) * (slope + slope_next) / 2
        x = x_euler
    return encoder.decode(x)[0].permute(1, 2, 0).numpy()


def test_nvidia_format_pickle_gives_the_reference_samplers_images(tmp_path) -> None:
    namespace: dict = {}
    exec(compile(NVIDIA_STYLE_SRC.replace('@persistence.persistent_class\n', ''), '<nvidia-style>', 'exec'), namespace)
    torch.manual_seed(5)
    net = namespace['TinyPrecond'](8, 3, 4).eval().requires_grad_(False)
    encoder = namespace['TinyEncoder']()
    data = {
        'ema': _HandBuiltPersistent(net, 'TinyPrecond', (8, 3, 4)),
        'encoder': _HandBuiltPersistent(encoder, 'TinyEncoder', ()),
    }
    pkl = tmp_path / 'edm2-nvidia-style.pkl'
    pkl.write_bytes(pickle.dumps(data))
    assert b'torch_utils.persistence' in pkl.read_bytes() and b'_HandBuilt' not in pkl.read_bytes()

    run_cli(
        f'--net={pkl}',
        f'--outdir={tmp_path / "out"}',
        '--seeds=0-4',
        '--batch=3',
        '--steps=6',
        '--S_churn=10',
        '--S_min=0.1',
        '--S_max=20',
    )
    pngs = read_pngs(str(tmp_path / 'out'))
    assert sorted(pngs) == [f'{seed:06d}.png' for seed in range(5)]
    with torch.no_grad():
        for seed in range(5):
            ref = reference_sample(net, encoder, seed, num_steps=6, S_churn=10, S_min=0.1, S_max=20)
            assert np.abs(pngs[f'{seed:06d}.png'].astype(int) - ref.astype(int)).max() <= 1
    assert len({png.tobytes() for png in pngs.values()}) == 5


# ----------------------------------------------------------------------------
# Acceptance 2: images depend on seeds and settings only.


def test_same_pngs_for_any_batch_size_two_ranks_and_repeated_runs(pickles, tmp_path) -> None:
    common = [f'--net={pickles["net"]}', '--seeds=0-9', '--steps=4', '--S_churn=10']
    for name, batch in [('b1', 1), ('b7', 7), ('b7-again', 7)]:
        run_cli(*common, f'--batch={batch}', f'--outdir={tmp_path / name}')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    cmd = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--standalone',
        '--nproc_per_node=2',
        'generate_images.py',
        *common,
        '--batch=3',
        '--device=cpu',
        f'--outdir={tmp_path / "ranks2"}',
        f'--grid={tmp_path / "grid.png"}',
        f'--npz={tmp_path / "all.npz"}',
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = {name: read_pngs(str(tmp_path / name)) for name in ['b1', 'b7', 'b7-again', 'ranks2']}
    assert sorted(runs['b1']) == [f'{seed:06d}.png' for seed in range(10)]
    for name in ['b7', 'ranks2']:
        assert sorted(runs[name]) == sorted(runs['b1'])
        for key, image in runs['b1'].items():
            assert np.abs(runs[name][key].astype(int) - image.astype(int)).max() <= 1, (name, key)
    assert all(np.array_equal(runs['b7'][k], runs['b7-again'][k]) for k in runs['b7'])

    # The 2-rank --npz and --grid hold every rank's images, in seed order.
    stacked = np.stack([runs['ranks2'][f'{seed:06d}.png'] for seed in range(10)])
    with np.load(tmp_path / 'all.npz') as npz:
        assert npz['arr_0'].dtype == np.uint8 and np.array_equal(npz['arr_0'], stacked)
    grid = np.asarray(PIL.Image.open(tmp_path / 'grid.png'))
    assert grid.shape == (3 * 8, 4 * 8, 3)  # 10 images: 4 columns, 3 rows
    for seed in range(10):
        row, col = divmod(seed, 4)
        assert np.array_equal(grid[row * 8 : (row + 1) * 8, col * 8 : (col + 1) * 8], stacked[seed])
    assert not grid[16:, 16:].any()


# ----------------------------------------------------------------------------
# Acceptance 3: guidance.


class CountingNet(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.img_resolution, self.img_channels, self.label_dim = net.img_resolution, net.img_channels, net.label_dim
        self.calls = 0

    def forward(self, *args, **kwargs) -> torch.Tensor:
        self.calls += 1
        return self.net(*args, **kwargs)


def test_guidance_one_never_evaluates_or_loads_the_guiding_net(pickles, tmp_path) -> None:
    gnet = CountingNet(tiny_precond(1, label_dim=0))
    batches = list(
        generation.generate_images(tiny_precond(0), gnet=gnet, seeds=range(3), device='cpu', num_steps=3, guidance=1)
    )
    assert gnet.calls == 0 and sum(len(b.seeds) for b in batches) == 3
    list(generation.generate_images(tiny_precond(0), gnet=gnet, seeds=range(3), device='cpu', num_steps=3, guidance=2))
    assert gnet.calls == 5
    run_cli(
        f'--net={pickles["net"]}',
        f'--gnet={tmp_path / "missing.pkl"}',
        '--guidance=1',
        '--steps=2',
        '--seeds=0',
        f'--outdir={tmp_path}',
    )


def test_guided_images_equal_the_guidance_formula(pickles) -> None:
    # One step from sigma to 0 lands on the guided denoiser's output: D_g + w (D - D_g) at x = sigma * noise.
    net, gnet, w, sigma, seeds = tiny_precond(0), tiny_precond(1, label_dim=0), 2.5, 1.3, [4, 9]
    (batch,) = generation.generate_images(
        net, gnet=gnet, seeds=seeds, device='cpu', num_steps=1, sigma_max=sigma, guidance=w
    )
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn([1, 3, 8, 8], generator=gen) * sigma
        label = torch.nn.functional.one_hot(torch.randint(3, [1], generator=gen), 3).float()
        assert torch.equal(batch.labels[i : i + 1], label)
        d, d_g = net(x, torch.tensor(sigma), label), gnet(x, torch.tensor(sigma))
        expected = StandardRGBEncoder().decode(d_g + w * (d - d_g))
        assert (batch.images[i : i + 1].int() - expected.int()).abs().max() <= 1
    (unguided,) = generation.generate_images(net, seeds=seeds, device='cpu', num_steps=1, sigma_max=sigma)
    assert not torch.equal(unguided.images, batch.images)


def test_solver_schedule_and_interval_options_reach_the_sampler(pickles, tmp_path) -> None:
    opts = ['--solver=dpm++3m', '--schedule=logsnr-uniform', '--guidance-interval=0.5,3', '--guidance=2']
    run_cli(
        f'--net={pickles["net"]}',
        f'--gnet={pickles["uncond"]}',
        '--seeds=1,4',
        '--steps=5',
        *opts,
        f'--npz={tmp_path / "a.npz"}',
    )
    net, gnet = (generation.load_network(pickles[k], torch.device('cpu'))[0] for k in ('net', 'uncond'))
    kwargs = dict(num_steps=5, solver='dpm++3m', schedule='logsnr-uniform', guidance_interval=(0.5, 3.0))
    with torch.no_grad():
        out = generation.sample(net, [1, 4], gnet=gnet, guidance=2, **kwargs).latents
        plain = generation.sample(net, [1, 4], gnet=gnet, guidance=2, num_steps=5).latents
    expected = StandardRGBEncoder().decode(out).permute(0, 2, 3, 1).numpy()
    images = np.load(tmp_path / 'a.npz')['arr_0']
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    assert not np.array_equal(images, StandardRGBEncoder().decode(plain).permute(0, 2, 3, 1).numpy())


def test_comma_lists_sweep_every_combination_into_its_own_subfolder(pickles, tmp_path) -> None:
    net, gnet = f'--net={pickles["net"]}', f'--gnet={pickles["uncond"]}'
    run_cli(
        net, gnet, '--seeds=2,5', '--guidance=1.5,2', '--solver=euler,dpm++2m', '--steps=3', f'--outdir={tmp_path}/sw'
    )
    folders = sorted(os.listdir(tmp_path / 'sw'))
    assert folders == ['w1.5-dpm++2m', 'w1.5-euler', 'w2.0-dpm++2m', 'w2.0-euler']
    for w, solver in ((1.5, 'euler'), (2.0, 'dpm++2m')):  # Each sub-folder holds what a single run writes.
        run_cli(
            net, gnet, '--seeds=2,5', f'--guidance={w}', f'--solver={solver}', '--steps=3', f'--outdir={tmp_path}/one'
        )
        single = read_pngs(tmp_path / 'one')
        swept = read_pngs(tmp_path / 'sw' / f'w{w}-{solver}')
        assert single.keys() == swept.keys() == {'000002.png', '000005.png'}
        assert all(np.array_equal(single[k], swept[k]) for k in single)
    with pytest.raises(generation.GenerationError, match='at least 1'):
        sampler_options.sweep_settings(dict(preset=None, net='n.pkl', gnet=None, guidance=None, num_steps='4,0'))


# ----------------------------------------------------------------------------
# Output layout and presets.


def test_subdirs_class_and_npz_layout(pickles, tmp_path) -> None:
    run_cli(
        f'--net={pickles["net"]}',
        '--seeds=999-1001',
        '--steps=2',
        '--class=2',
        '--subdirs',
        f'--outdir={tmp_path / "out"}',
        f'--npz={tmp_path / "a.npz"}',
    )
    assert sorted(os.listdir(tmp_path / 'out')) == ['000000', '001000']
    assert sorted(os.listdir(tmp_path / 'out' / '001000')) == ['001000.png', '001001.png']
    with np.load(tmp_path / 'a.npz') as npz:
        assert npz['arr_0'].shape == (3, 8, 8, 3)
        assert np.array_equal(npz['arr_0'][0], np.asarray(PIL.Image.open(tmp_path / 'out' / '000000' / '000999.png')))
    (batch,) = generation.generate_images(pickles['net'], seeds=[999], device='cpu', num_steps=2, class_idx=2)
    assert batch.labels.argmax(dim=1).tolist() == [2]


def test_demo_preset_uses_the_newest_snapshot_in_runs_demo(pickles, tmp_path, monkeypatch) -> None:
    run_dir = tmp_path / 'runs' / 'demo'
    run_dir.mkdir(parents=True)
    newest = run_dir / 'network-snapshot-0000200-0.050.pkl'  # The demo guides itself by its null label.
    save_network_pickle({'ema': tiny_precond(0, label_dropout=0.1), 'encoder': StandardRGBEncoder()}, str(newest))
    os.symlink(pickles['res16'], run_dir / 'network-snapshot-0000100-0.100.pkl')
    os.symlink(pickles['res16'], run_dir / 'network-snapshot-0000200-0.010.pkl')
    (run_dir / 'samples-0000200.png').write_bytes(b'')
    monkeypatch.chdir(tmp_path)
    output = run_cli('--preset=demo', '--seeds=0-3', '--steps=2', '--grid=grid.png')
    assert 'network-snapshot-0000200-0.050.pkl' in output
    assert np.asarray(PIL.Image.open(tmp_path / 'grid.png')).shape == (16, 16, 3)


def test_every_published_preset_names_a_published_pickle() -> None:
    from training.presets_generate import presets

    name_re = r'https://nvlabs-fi-cdn\.nvidia\.com/edm2/posthoc-reconstructions/edm2-img(512|64)-(xs|s|m|l|xl|xxl)(-uncond)?-\d{7}-0\.\d{3}\.pkl'
    published = [name for name in presets if name.startswith('edm2-')]
    assert len(published) == 37
    for name in published:
        p = presets[name]
        assert re.fullmatch(name_re, p.net) and (p.gnet is None) == (p.guidance == 1)
        assert p.gnet is None or re.fullmatch(name_re, p.gnet)
        assert p.net.split('/')[-1].startswith(f'edm2-{name.split("-")[1]}-')
    assert presets['edm2-img512-xxl-autog-dino'].gnet.endswith('edm2-img512-m-0268435-0.205.pkl')


# ----------------------------------------------------------------------------
# Acceptance 6: bad input ends with one clear line.


@pytest.mark.parametrize(
    'args, message',
    [
        (['--net={missing}'], 'not found'),
        (['--net={not-network}'], 'holds no network'),
        (['--net={ema-not-module}'], 'holds no network'),
        (['--net={garbage}'], 'not a readable network pickle'),
        (['--net={net}', '--seeds=5-2'], 'reversed range'),
        (['--net={net}', '--seeds=0-3,2', '--npz={npz}'], 'seed 2 comes twice'),
        (['--net={net}', '--clip={net}', '--prompt=x'], '--clip needs --clip-scale'),
        (['--net={net}', '--class=3'], 'classes 0 to 2'),
        (['--net={uncond}', '--class=0'], 'unconditional'),
        (['--net={net}', '--gnet={res16}', '--guidance=2'], '3x16x16'),
        (['--net={net}', '--guidance=2'], 'guiding network'),
        (['--preset=no-such-preset'], 'Unknown preset'),
        (['--net={emptydir}'], 'holds no network snapshot'),
        (['--net={net}', '--device=nonsense'], '--device=nonsense'),
        (['--net={net}', '--solver=rk4'], 'Unknown solver'),
        (['--net={net}', '--schedule=cosine'], 'Unknown schedule'),
        (['--net={net}', '--solver=dpm++3m'], 'at least 3 steps'),
        (['--net={net}', '--solver=euler', '--S_churn=5'], 'heun solver only'),
        (['--net={net}', '--guidance-interval=5,1'], 'needs 0 <= LO <= HI'),
        (['--net={net}', '--sampler=ddim', '--solver=dpm++2m'], '--solver applies to --sampler=edm only'),
        (['--net={net}', '--respacing=10'], '--respacing applies to --sampler=ddpm and ddim only'),
        (['--net={net}', '--guidance-interval=0.3'], 'LO,HI'),
        (['--net={net}', '--gnet={uncond}', '--guidance=1.5,x'], 'comma list'),
        (['--cascade=demo-text', '--guidance=1.5,2'], 'one value'),
        (['--net={net}', '--clip-scale=100'], '--clip-scale applies with --clip'),
        (['--net={net}', '--aug-sigma=0.1'], '--aug-sigma applies to --cascade only'),
        (['--cascade=demo-text', '--prompt=x', '--class=1'], '--class does not apply to --cascade'),
    ],
)
def test_bad_input_gives_one_error_line(pickles, tmp_path, args, message) -> None:
    (tmp_path / 'empty').mkdir()
    paths = dict(pickles, missing=str(tmp_path / 'missing.pkl'), emptydir=str(tmp_path / 'empty'))
    paths['npz'] = str(tmp_path / 'out' / 'x.npz')
    args = [arg.format(**paths) for arg in args]
    result = CliRunner().invoke(generate_images.main, [*args, '--steps=2', f'--outdir={tmp_path / "out"}'])
    lines = [
        line
        for line in result.output.splitlines()
        if line.strip() and '%|' not in line and not line.startswith(('Loading', 'Generating'))
    ]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith('Error: ') and message in lines[0], result.output
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


def test_nothing_to_write_is_an_error() -> None:
    result = CliRunner().invoke(generate_images.main, ['--preset=demo'])
    assert result.exit_code == 1 and result.output.strip() == 'Error: Nothing to write: give --outdir, --grid or --npz.'


@pytest.mark.parametrize(
    'args, message',
    [
        (['--grid={net}'], '--grid={net}: name a .png file'),
        (['--npz={net}'], '--npz={net}: name a .npz file'),
        (['--gnet={uncond}', '--guidance=2,3', '--npz={uncond}'], 'name a .npz file'),
        (['--grid={folder}.png'], 'is a folder'),
        (['--outdir={file}'], 'is a file, not a folder'),
        (['--grid={file}/g.png'], 'is a file, not a folder'),
        (['--grid={prompts_stem}.png', '--prompts={prompts_stem}.txt', '--clip={net}', '--clip-scale=1'], '--prompts'),
        (['--outdir={tmp}', '--prompts={tmp}/captions.txt', '--clip={net}', '--clip-scale=1'], 'captions.txt over'),
    ],
)
def test_an_output_that_would_replace_an_input_or_cannot_be_written_is_refused_before_generating(
    pickles, tmp_path, args, message
) -> None:
    (tmp_path / 'folder.png').mkdir()
    (tmp_path / 'file').write_text('keep')
    (tmp_path / 'prompts.txt').write_text('a red circle\n')
    (tmp_path / 'captions.txt').write_text('a blue square\n')
    paths = dict(pickles, folder=str(tmp_path / 'folder'), file=str(tmp_path / 'file'), tmp=str(tmp_path))
    paths['prompts_stem'] = str(tmp_path / 'prompts')
    inputs = [pickles['net'], pickles['uncond'], str(tmp_path / 'prompts.txt'), str(tmp_path / 'captions.txt')]
    before = {p: open(p, 'rb').read() for p in inputs}
    args = [arg.format(**paths) for arg in args]
    result = CliRunner().invoke(generate_images.main, ['--net={net}'.format(**pickles), *args, '--steps=2'])
    assert result.exit_code == 1 and result.output.count('Error: ') == 1, result.output
    assert message.format(**paths) in result.output and 'Generating' not in result.output
    assert {p: open(p, 'rb').read() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ['captions.txt', 'file', 'folder.png', 'prompts.txt']
    assert (tmp_path / 'file').read_text() == 'keep'
