"""calculate_metrics.py end to end (ref, calc, gen) on tiny image sets, detectors loaded from local files.

FID runs through NVIDIA's TorchScript-pickle route with a small scripted stand-in and FD-DINOv2 through a
small ViT saved with the published key names (its architecture is read from the file), so every step
is fast; the real-size detectors run in the slow test at the end (pytest -m slow).
"""

import json
import os
import pickle
import socket

import click
import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import calculate_metrics
import dataset_tool
from training.detectors import load_detector, resolve_detector_sources
from training.encoders import StandardRGBEncoder
from training.generation import generate_images
from training.metrics import calculate_metrics_from_stats, load_stats
from training.networks_edm2 import Precond
from training.snapshots import save_network_pickle

pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.:DeprecationWarning')


class _FakeScriptInception(torch.nn.Module):
    """Stands in for NVIDIA's TorchScript detector: 12 features, per-quadrant channel means."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32), 2).flatten(1)
        return x if return_features else x.sum(dim=1, keepdim=True)


class _ScriptPickle:
    """Pickles as a call to torch.jit.load, so unpickling yields a TorchScript module as NVIDIA's file does."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return torch.jit.load, (self.path,)


def _tiny_dinov2_state(seed: int = 0, dim: int = 64, grid: int = 5) -> dict[str, torch.Tensor]:
    """Random weights under dinov2_vitl14_pretrain.pth's key names, one block of width 64."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        'cls_token': (1, 1, dim),
        'pos_embed': (1, grid * grid + 1, dim),
        'mask_token': (1, dim),
        'patch_embed.proj.weight': (dim, 3, 14, 14),
        'patch_embed.proj.bias': (dim,),
        'norm.weight': (dim,),
        'norm.bias': (dim,),
    }
    for name, shape in [
        ('norm1.weight', (dim,)),
        ('norm1.bias', (dim,)),
        ('attn.qkv.weight', (3 * dim, dim)),
        ('attn.qkv.bias', (3 * dim,)),
        ('attn.proj.weight', (dim, dim)),
        ('attn.proj.bias', (dim,)),
        ('ls1.gamma', (dim,)),
        ('norm2.weight', (dim,)),
        ('norm2.bias', (dim,)),
        ('mlp.fc1.weight', (4 * dim, dim)),
        ('mlp.fc1.bias', (4 * dim,)),
        ('mlp.fc2.weight', (dim, 4 * dim)),
        ('mlp.fc2.bias', (dim,)),
        ('ls2.gamma', (dim,)),
    ]:
        shapes[f'blocks.0.{name}'] = shape
    return {
        k: torch.randn(s, generator=gen) * (0.5 if len(s) == 2 or k.startswith('patch_embed') else 1)
        for k, s in shapes.items()
    }


def _write_pngs(folder, images: np.ndarray) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        PIL.Image.fromarray(image.squeeze()).save(os.path.join(folder, f'{i:06d}.png'))
    return str(folder)


@pytest.fixture(scope='module')
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp('metrics')
    detectors = root / 'detectors'
    detectors.mkdir()
    torch.jit.script(_FakeScriptInception()).save(str(detectors / 'fake.pt'))
    with open(detectors / 'inception-2015-12-05.pkl', 'wb') as f:
        pickle.dump(_ScriptPickle(str(detectors / 'fake.pt')), f)
    torch.save(_tiny_dinov2_state(), detectors / 'dinov2_vitl14_pretrain.pth')
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    net = Precond(
        img_resolution=8,
        img_channels=3,
        label_dim=0,
        use_fp16=False,
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
    )
    save_network_pickle(
        {'ema': net.eval().requires_grad_(False), 'encoder': StandardRGBEncoder()}, str(root / 'net.pkl')
    )
    return dict(
        detectors=str(detectors),
        root=str(root),
        net=str(root / 'net.pkl'),
        images=_write_pngs(root / 'images', rng.integers(0, 256, [6, 16, 16, 3], dtype=np.uint8)),
        gray=_write_pngs(root / 'gray', rng.integers(0, 256, [3, 16, 16, 1], dtype=np.uint8)),
    )


def _cli(*args: str) -> tuple[int, str]:
    """Exit code and stdout of one command, or its stderr when it failed (tqdm bars also go to stderr)."""
    result = CliRunner().invoke(calculate_metrics.cli, list(args))
    assert 'Traceback' not in result.output
    return result.exit_code, result.stdout if result.exit_code == 0 else result.stderr


def _metrics_from_output(output: str) -> dict[str, float]:
    pairs = (line.split() for line in output.splitlines() if line.startswith(('fid ', 'fd_dinov2 ')))
    return {name: float(value) for name, value in pairs}


def _direct_stats(images: torch.Tensor, detectors: str) -> dict[str, dict[str, np.ndarray]]:
    """Embed all images in one batch and take numpy's mean and covariance: no sums, shards or batching."""
    stats = {}
    for metric, source in resolve_detector_sources(['fid', 'fd_dinov2'], detectors).items():
        features = load_detector(metric, source, verbose=False)(images).double().numpy()
        stats[metric] = {'mu': features.mean(axis=0), 'sigma': np.cov(features, rowvar=False)}
    return stats


def _folder_images(folder: str) -> torch.Tensor:
    names = sorted(os.listdir(folder))
    return torch.from_numpy(np.stack([np.array(PIL.Image.open(os.path.join(folder, n))) for n in names])).permute(
        0, 3, 1, 2
    )


@pytest.fixture(scope='module')
def ref_pkl(files) -> str:
    dest = os.path.join(files['root'], 'refs', 'ref.pkl')
    code, output = _cli(
        'ref',
        f'--data={files["images"]}',
        f'--dest={dest}',
        f'--detectors={files["detectors"]}',
        '--batch=4',
        '--workers=0',
        '--device=cpu',
    )
    assert code == 0, output
    return dest


def test_ref_statistics_equal_direct_embedding(files, ref_pkl):
    stats = load_stats(ref_pkl)
    expected = _direct_stats(_folder_images(files['images']), files['detectors'])
    assert set(stats) == {'fid', 'fd_dinov2'}
    assert stats['fid']['mu'].shape == (12,) and stats['fd_dinov2']['mu'].shape == (64,)
    for metric in expected:
        for key in ('mu', 'sigma'):
            np.testing.assert_allclose(
                stats[metric][key], expected[metric][key], rtol=1e-6, atol=1e-6 * np.abs(expected[metric][key]).max()
            )


def test_calc_of_the_reference_images_is_zero_and_subsets_are_not(files, ref_pkl):
    code, output = _cli(
        'calc',
        f'--images={files["images"]}',
        f'--ref={ref_pkl}',
        '--num=6',
        f'--detectors={files["detectors"]}',
        '--workers=0',
        '--device=cpu',
    )
    assert code == 0, output
    values = _metrics_from_output(output)
    assert set(values) == {'fid', 'fd_dinov2'} and all(abs(v) < 1e-6 for v in values.values())
    subsets = []
    for seed in (1, 1, 2):
        code, output = _cli(
            'calc',
            f'--images={files["images"]}',
            f'--ref={ref_pkl}',
            '--num=4',
            f'--seed={seed}',
            '--metrics=fid',
            f'--detectors={files["detectors"]}',
            '--workers=0',
            '--device=cpu',
        )
        assert code == 0, output
        subsets.append(_metrics_from_output(output)['fid'])
    assert subsets[0] == subsets[1] > 0 and subsets[2] != subsets[0]


def test_gen_matches_direct_generation_and_embedding(files, ref_pkl, monkeypatch):
    monkeypatch.setenv('EDM2X_DETECTORS', files['detectors'])
    code, output = _cli(
        'gen',
        f'--net={files["net"]}',
        f'--ref={ref_pkl}',
        '--num=3',
        '--seed=5',
        '--steps=2',
        '--batch=2',
        '--device=cpu',
    )
    assert code == 0, output
    values = _metrics_from_output(output)
    images = torch.cat([b.images for b in generate_images(files['net'], seeds=range(5, 8), num_steps=2, device='cpu')])
    expected = calculate_metrics_from_stats(_direct_stats(images, files['detectors']), load_stats(ref_pkl))
    assert values.keys() == expected.keys()
    for metric in expected:
        assert values[metric] == pytest.approx(expected[metric], rel=1e-5)


@pytest.mark.parametrize('case', ['too-few', 'gray-calc', 'gray-ref', 'ref-lacks-metric', 'bad-metric'])
def test_bad_input_ends_with_one_error_line(files, ref_pkl, case):
    fid_only = os.path.join(files['root'], 'refs', 'fid-only.pkl')
    if case == 'ref-lacks-metric':
        assert (
            _cli(
                'ref',
                f'--data={files["images"]}',
                f'--dest={fid_only}',
                '--metrics=fid',
                f'--detectors={files["detectors"]}',
                '--workers=0',
                '--device=cpu',
            )[0]
            == 0
        )
    common = [f'--detectors={files["detectors"]}', '--workers=0', '--device=cpu']
    args, expected = {
        'too-few': (
            ['calc', f'--images={files["images"]}', f'--ref={ref_pkl}', '--num=7'],
            'holds 6 images, fewer than --num=7',
        ),
        'gray-calc': (['calc', f'--images={files["gray"]}', f'--ref={ref_pkl}', '--num=3'], 'images with 1 channel(s)'),
        'gray-ref': (['ref', f'--data={files["gray"]}', f'--dest={files["root"]}/x.pkl'], 'images with 1 channel(s)'),
        'ref-lacks-metric': (
            ['calc', f'--images={files["images"]}', f'--ref={fid_only}', '--num=6'],
            'holds no "fd_dinov2"',
        ),
        'bad-metric': (
            ['calc', f'--images={files["images"]}', f'--ref={ref_pkl}', '--metrics=fid,kid'],
            'Unknown metric "kid"',
        ),
    }[case]
    code, output = _cli(*args, *common)
    lines = [line for line in output.splitlines() if line.strip()]
    assert code != 0 and lines[-1].startswith('Error: ') and expected in lines[-1]
    assert sum(line.startswith('Error') for line in lines) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ref_worker(rank: int, world: int, port: int, args: list[str]) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    leave_group, world_sizes = calculate_metrics.dist.finish, []

    def finish() -> None:
        world_sizes.append(torch.distributed.get_world_size())
        leave_group()

    calculate_metrics.dist.finish = finish
    calculate_metrics.cli.main(args=args, standalone_mode=False)
    assert world_sizes == [world]  # the command really ran sharded, and left the group at its end
    assert not torch.distributed.is_initialized()


def _bad_ref_worker(rank: int, world: int, port: int, args: list[str]) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    expected = click.ClickException if rank == 0 else SystemExit  # one error line, from rank 0
    with pytest.raises(expected) as caught:
        calculate_metrics.cli.main(args=args, standalone_mode=False)
    assert 'nothere.pkl' in caught.value.message if rank == 0 else caught.value.code == 1


def test_a_bad_reference_under_two_ranks_is_one_error_line_from_rank_0(files, tmp_path):
    args = ['calc', f'--images={files["images"]}', f'--ref={tmp_path}/nothere.pkl', '--num=4', '--device=cpu']
    torch.multiprocessing.spawn(_bad_ref_worker, args=(2, _free_port(), args), nprocs=2)


def test_two_gloo_ranks_give_the_single_process_statistics(files, ref_pkl, tmp_path):
    # 5 images: the ranks get unequal shares (3 and 2) and different batch compositions.
    data = _write_pngs(
        tmp_path / 'five',
        np.stack([np.array(PIL.Image.open(os.path.join(files['images'], f'{i:06d}.png'))) for i in range(5)]),
    )
    common = ['ref', f'--data={data}', f'--detectors={files["detectors"]}', '--batch=2', '--workers=0', '--device=cpu']
    assert _cli(*common, f'--dest={tmp_path}/one.pkl')[0] == 0
    torch.multiprocessing.spawn(_ref_worker, args=(2, _free_port(), [*common, f'--dest={tmp_path}/two.pkl']), nprocs=2)
    one, two = load_stats(f'{tmp_path}/one.pkl'), load_stats(f'{tmp_path}/two.pkl')
    for metric in one:
        for key in ('mu', 'sigma'):
            scale = np.abs(one[metric][key]).max()
            np.testing.assert_allclose(two[metric][key], one[metric][key], rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.slow
def test_real_size_detectors_end_to_end(files, tmp_path):
    from test_detectors import INCEPTION_LAYOUT, dinov2_layout, random_state

    torch.save(random_state(INCEPTION_LAYOUT), tmp_path / 'pt_inception-2015-12-05-6726825d.pth')
    torch.save(random_state(dinov2_layout()), tmp_path / 'dinov2_vitl14_pretrain.pth')
    common = [f'--detectors={tmp_path}', '--device=cpu', '--batch=3']
    assert _cli('ref', f'--data={files["images"]}', f'--dest={tmp_path}/ref.pkl', '--workers=0', *common)[0] == 0
    stats = load_stats(f'{tmp_path}/ref.pkl')
    assert stats['fid']['mu'].shape == (2048,) and stats['fd_dinov2']['mu'].shape == (1024,)
    code, output = _cli(
        'calc', f'--images={files["images"]}', f'--ref={tmp_path}/ref.pkl', '--num=6', '--workers=0', *common
    )
    assert code == 0 and all(abs(v) < 1e-6 for v in _metrics_from_output(output).values()), output
    code, output = _cli('gen', f'--net={files["net"]}', f'--ref={tmp_path}/ref.pkl', '--num=2', '--steps=2', *common)
    assert code == 0 and set(_metrics_from_output(output)) == {'fid', 'fd_dinov2'}, output


def test_ref_of_tar_shards_equals_ref_of_the_folder(files, ref_pkl, tmp_path):
    from training.shard_writer import make_shards

    shards = str(tmp_path / 'shards')
    make_shards(files['images'], shards, per_shard=5)
    dest = str(tmp_path / 'shards.pkl')
    args = [f'--data={shards}', f'--dest={dest}', f'--detectors={files["detectors"]}', '--batch=4', '--device=cpu']
    code, output = _cli('ref', *args, '--workers=2')
    assert code == 0, output
    stats, folder = load_stats(dest), load_stats(ref_pkl)
    for metric in folder:
        for key in ('mu', 'sigma'):
            np.testing.assert_allclose(stats[metric][key], folder[metric][key], rtol=1e-5, atol=1e-6)


def test_ref_of_shards_with_a_corrupt_sample_is_an_error_not_statistics_of_fewer_images(files, tmp_path):
    from test_shards import write_shards

    write_shards(tmp_path / 'shards', num_shards=1, per_shard=4, corrupt={2})
    dest = str(tmp_path / 'shards.pkl')
    args = [f'--data={tmp_path / "shards"}', f'--dest={dest}', f'--detectors={files["detectors"]}', '--device=cpu']
    code, output = _cli('ref', *args, '--batch=2', '--workers=0')
    assert code == 1 and '000000.tar:000000002.jpg: unreadable image' in output and not os.path.exists(dest)


def test_ref_of_mixed_size_shards_with_resolution_equals_ref_of_their_converted_zip(files, tmp_path):
    from training.shard_writer import make_shards

    rng = np.random.default_rng(1)
    source = tmp_path / 'mixed'
    source.mkdir()
    for i, (h, w) in enumerate([(20, 16), (16, 24), (32, 32), (18, 18), (40, 20)]):
        PIL.Image.fromarray(rng.integers(0, 256, [h, w, 3], dtype=np.uint8)).save(source / f'{i:06d}.png')
    shards, zip_path = str(tmp_path / 'shards'), str(tmp_path / 'converted.zip')
    make_shards(str(source), shards, per_shard=2)
    convert = ['convert', f'--source={source}', f'--dest={zip_path}', '--resolution=16', '--transform=center-crop']
    assert CliRunner().invoke(dataset_tool.cli, convert).exit_code == 0
    common = [f'--detectors={files["detectors"]}', '--batch=2', '--device=cpu', '--workers=0']
    assert _cli('ref', f'--data={shards}', '--resolution=16', f'--dest={tmp_path}/s.pkl', *common)[0] == 0
    assert _cli('ref', f'--data={zip_path}', f'--dest={tmp_path}/z.pkl', *common)[0] == 0
    streamed, converted = load_stats(f'{tmp_path}/s.pkl'), load_stats(f'{tmp_path}/z.pkl')
    for metric in converted:
        for key in ('mu', 'sigma'):
            np.testing.assert_allclose(streamed[metric][key], converted[metric][key], rtol=1e-5, atol=1e-6)

    code, output = _cli('ref', f'--data={shards}', '--resolution=24', f'--dest={tmp_path}/small.pkl', *common)
    assert code == 1 and 'is smaller than the resolution 24; give --upscale' in output
    assert not os.path.exists(f'{tmp_path}/small.pkl')
    code, output = _cli('ref', f'--data={zip_path}', '--resolution=16', f'--dest={tmp_path}/x.pkl', *common)
    assert code == 1 and 'resize a ZIP or folder once with dataset_tool.py convert' in output, output


def test_gen_sweep_prints_one_json_line_per_setting_equal_to_its_single_run(files, ref_pkl, monkeypatch):
    monkeypatch.setenv('EDM2X_DETECTORS', files['detectors'])
    common = [f'--net={files["net"]}', f'--ref={ref_pkl}', '--num=3', '--batch=2', '--device=cpu']
    code, output = _cli('gen', *common, '--solver=heun,euler', '--steps=2,3')
    assert code == 0, output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith('{')]
    assert [(r['solver'], r['num_steps']) for r in lines] == [('heun', 2), ('heun', 3), ('euler', 2), ('euler', 3)]
    for r in lines:
        code, single = _cli('gen', *common, f'--solver={r["solver"]}', f'--steps={r["num_steps"]}')
        assert code == 0, single
        values = _metrics_from_output(single)
        assert values.keys() <= r.keys()
        for metric, value in values.items():
            assert r[metric] == pytest.approx(value, rel=1e-5)  # the single run prints 6 significant digits
    assert len({r['fid'] for r in lines}) == 4  # each setting really sampled differently


def test_gen_sweep_rows_name_the_sampler_and_no_solver_it_did_not_run(files, ref_pkl, monkeypatch):
    """Under --sampler=ddim a row says ddim, not the EDM sampler's default solver heun; its metrics are the ddim
    run's and differ from the EDM sampler's at the same steps."""
    monkeypatch.setenv('EDM2X_DETECTORS', files['detectors'])
    common = [f'--net={files["net"]}', f'--ref={ref_pkl}', '--num=3', '--batch=2', '--device=cpu', '--metrics=fid']
    code, output = _cli('gen', *common, '--sampler=ddim', '--steps=2,3')
    assert code == 0, output
    lines = [json.loads(line) for line in output.splitlines() if line.startswith('{')]
    assert [(r['sampler'], r['solver'], r['num_steps']) for r in lines] == [('ddim', None, 2), ('ddim', None, 3)]
    for r in lines:
        for sampler, same in (('ddim', True), ('edm', False)):
            code, single = _cli('gen', *common, f'--sampler={sampler}', f'--steps={r["num_steps"]}')
            assert code == 0, single
            assert (r['fid'] == pytest.approx(_metrics_from_output(single)['fid'], rel=1e-5)) == same
    code, output = _cli('gen', *common, '--steps=2,3')
    rows = [json.loads(line) for line in output.splitlines() if line.startswith('{')]
    assert [(r['sampler'], r['solver']) for r in rows] == [('edm', 'heun')] * 2


def test_gen_of_a_text_net_without_prompts_names_the_option_gen_has(files, ref_pkl, tmp_path):
    from test_networks_text import tiny_text_net

    net = str(tmp_path / 'text.pkl')
    save_network_pickle(dict(ema=tiny_text_net(), encoder=StandardRGBEncoder()), net)
    code, output = _cli('gen', f'--net={net}', f'--ref={ref_pkl}', '--num=2', f'--detectors={files["detectors"]}')
    assert code == 1 and 'give --prompts=FILE, one caption per line' in output and '--prompt=' not in output


@pytest.mark.parametrize(
    'dest, message',
    [('{data}', 'name a .pkl or .npz file'), ('{folder}', 'is a folder'), ('{data}/x.pkl', 'is a file, not a folder')],
)
def test_ref_refuses_a_dest_it_would_write_over_its_data_or_cannot_write_before_embedding(tmp_path, dest, message):
    data, folder = tmp_path / 'data.zip', tmp_path / 'refs.pkl'
    data.write_bytes(b'keep')
    folder.mkdir()
    dest = dest.format(data=data, folder=folder)
    code, output = _cli('ref', f'--data={data}', f'--dest={dest}', '--device=cpu', '--detectors=none-needed')
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f'Error: --dest={dest}') and message in lines[0]
    assert data.read_bytes() == b'keep' and sorted(os.listdir(tmp_path)) == ['data.zip', 'refs.pkl']


def test_gen_refuses_a_run_dir_it_would_not_log_to(tmp_path):
    code, output = _cli('gen', f'--net={tmp_path}/x.pkl', f'--ref={tmp_path}/r.pkl', f'--run-dir={tmp_path}')
    assert (
        code == 1
        and output.strip() == 'Error: --run-dir applies with --logger only: it names the training run to log to.'
    )
