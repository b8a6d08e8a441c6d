"""What a new user meets in the first hour, each tried through the command line: run folders that refuse
mistakes before anything is written, starts that fail without leaving files, status and closing lines,
and one-line messages from generate_images.py, reconstruct_phema.py, calculate_metrics.py and dataset_tool.py."""

import io
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error

import calculate_metrics
import dataset_tool
import generate_images
import reconstruct_phema
import train_edm2
from training import detectors as detectors_mod
from training.metrics import save_stats
from training.run_outputs import closing_line
from training.snapshots import save_network_pickle, snapshot_name

FAST = ['--preset=demo-tiny', '--workers=0', '--seed=1', '--status=16', '--snapshot=32', '--checkpoint=16']


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, module_cache):
    """A 32-image demo-tiny run (two steps) and what its command printed."""
    run = str(tmp_path_factory.mktemp('finished') / 'run')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('DNNLIB_CACHE_DIR', module_cache)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        result = CliRunner().invoke(train_edm2.main, [f'--outdir={run}', '--duration=32', *FAST])
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return run, result.output


def _train(*args: str):
    return CliRunner().invoke(train_edm2.main, list(args))


def _folder_state(path: str) -> dict[str, bytes]:
    return {name: open(os.path.join(path, name), 'rb').read() for name in sorted(os.listdir(path))}


def _write_pngs(folder, sizes, corrupt: int | None = None) -> str:
    os.makedirs(folder)
    for i, (w, h) in enumerate(sizes):
        path = os.path.join(folder, f'img{i}.png')
        if i == corrupt:
            open(path, 'wb').write(b'not a png at all')
        else:
            PIL.Image.fromarray(np.full([h, w, 3], 20 * i, dtype=np.uint8)).save(path)
    return str(folder)


# ---- train_edm2.py ----


def test_status_lines_show_target_and_eta_and_no_nan_loss(finished_run):
    _run, output = finished_run
    lines = [line for line in output.splitlines() if line.startswith('kimg ')]
    assert len(lines) == 3
    assert lines[0].split()[1] == '0.0/0.0' and 'loss -' in lines[0] and 'eta -' in lines[0]
    assert 'nan' not in output
    assert all(' eta ' in line and '/0.0' in line.split()[1] for line in lines)


def test_closing_line_names_the_final_grid_and_the_sampling_command(finished_run):
    run, output = finished_run
    last = output.strip().splitlines()[-1]
    grid = os.path.join(run, 'samples-0000000.png')
    assert f'Final sample grid: {grid}' in last and f'python generate_images.py --net={run}' in last
    assert PIL.Image.open(grid).size == (512, 512)  # 4x4 samples of 16 px, each pixel shown 8x8


def test_rerun_of_a_finished_run_says_it_is_complete(finished_run, module_cache_env):
    run, _output = finished_run
    before = _folder_state(run)
    result = _train(f'--outdir={run}', '--duration=32', *FAST)
    assert result.exit_code == 0, result.output
    assert f'{run} is already complete at kimg 0.0' in result.output and 'Final sample grid' in result.output
    after = _folder_state(run)
    assert {k: v for k, v in after.items() if k != 'log.txt'} == {k: v for k, v in before.items() if k != 'log.txt'}


def test_other_settings_on_an_existing_run_are_refused_before_anything_is_touched(finished_run, module_cache_env):
    run, _output = finished_run
    before = _folder_state(run)
    result = _train(f'--outdir={run}', '--duration=32', '--channels=32', *FAST)
    assert_one_line_error(result, '--channels (network_kwargs.model_channels) is 16 there, 32 now', run)
    assert 'Traceback' not in result.output and _folder_state(run) == before


def test_resume_may_change_the_duration_output_intervals_and_retention(tmp_path, finished_run, module_cache_env):
    run = str(tmp_path / 'run')
    assert _train(f'--outdir={run}', '--duration=16', *FAST).exit_code == 0
    changed = ['--duration=32', '--workers=1', '--status=32', '--snapshot=32', '--checkpoint=32']
    changed += ['--keep-checkpoints=1', '--continue-on-snapshot-error']  # What a disk-full stop or warning advises.
    changed += ['--snapshot-fp32', '--snapshot-format=both']  # Outputs only.
    result = _train(f'--outdir={run}', '--preset=demo-tiny', '--seed=1', *changed)
    assert result.exit_code == 0, result.output
    assert 'Resuming from' in result.output
    stats = [json.loads(line) for line in open(os.path.join(run, 'stats.jsonl'))]
    assert [round(s['Progress/kimg'] * 1000) for s in stats] == [0, 16, 32]
    assert json.load(open(os.path.join(run, 'training_options.json')))['total_nimg'] == 32
    assert any(name.endswith('.safetensors') for name in os.listdir(run))


def test_precision_change_on_resume_names_the_precision_option(finished_run, module_cache_env):
    run, _output = finished_run
    saved = json.load(open(os.path.join(run, 'training_options.json')))['network_kwargs']['use_fp16']
    other = 'fp32' if saved else 'bf16'  # The run's default: bf16 on a CPU with bf16 instructions, else fp32.
    result = _train(f'--outdir={run}', '--duration=32', f'--precision={other}', *FAST)
    assert_one_line_error(result, '--precision (network_kwargs.use_fp16) is', run)


def test_dry_run_needs_no_outdir(module_cache_env):
    result = _train('--preset=demo-tiny', '--dry-run')
    assert result.exit_code == 0, result.output
    assert '"batch_size": 16' in result.output and 'Dry run' in result.output
    assert_one_line_error(_train('--preset=demo-tiny'), 'Missing option --outdir')


@pytest.mark.parametrize(
    'sizes, corrupt, message',
    [
        ([(16, 12), (16, 12)], None, 'images are 16x12, not square'),
        ([(16, 16), (16, 16), (12, 12), (16, 16)], None, 'img2.png: image is 12x12'),
        ([(16, 16), (16, 16), (16, 16)], 1, 'img1.png: unreadable image'),
    ],
    ids=['non-square', 'mixed-sizes', 'corrupt-image'],
)
def test_failed_start_leaves_no_run_folder(tmp_path, module_cache_env, sizes, corrupt, message):
    """More bad files than --max-bad-samples allows (0 here) stop the start before the folder is made."""
    data = _write_pngs(tmp_path / 'data', sizes, corrupt)
    run = tmp_path / 'runs' / 'new'
    args = [f'--outdir={run}', f'--data={data}', '--cond=False', '--max-bad-samples=0', *FAST]
    assert_one_line_error(_train(*args), message)
    assert not os.path.exists(tmp_path / 'runs')


def test_bad_files_within_max_bad_samples_are_named_at_start_and_training_goes_on(tmp_path, module_cache_env):
    data = _write_pngs(tmp_path / 'data', [(16, 16)] * 4 + [(12, 12)], corrupt=1)
    result = _train(f'--outdir={tmp_path / "run"}', f'--data={data}', '--cond=False', '--max-bad-samples=2', *FAST)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith('Warning: ')]
    assert len(warnings) == 2 and 'img1.png: unreadable image' in warnings[0] and 'img4.png' in warnings[1]
    logged = (tmp_path / 'run' / 'log.txt').read_text().splitlines()
    assert [line for line in logged if line.startswith('Warning: ')] == warnings  # the run's record has them too


def test_snapshots_under_a_kimg_apart_are_noted_as_sharing_names(tmp_path, module_cache_env):
    result = _train(f'--outdir={tmp_path / "run"}', *FAST, '--snapshot=512', '--duration=32')
    assert result.exit_code == 0, result.output
    assert 'Note: --snapshot=512 is under 1000 images' in result.output


def test_non_square_latents_are_refused_before_the_folder_is_made(tmp_path, module_cache_env):
    data = tmp_path / 'latents'
    data.mkdir()
    for i in range(2):
        np.save(data / f'x{i}.npy', np.zeros([8, 4, 6], dtype=np.float32))
    assert_one_line_error(_train(f'--outdir={tmp_path / "run"}', f'--data={data}', '--cond=False', *FAST), '6x4')
    assert not os.path.exists(tmp_path / 'run')


def test_outdir_that_is_a_file_is_one_line(tmp_path, module_cache_env):
    target = tmp_path / 'notes.txt'
    target.write_text('mine')
    assert_one_line_error(_train(f'--outdir={target}', *FAST), 'is a file, not a folder')
    assert target.read_text() == 'mine'


def test_outdir_under_a_file_names_that_file_in_one_line(tmp_path, module_cache_env):
    target = tmp_path / 'notes.txt'
    target.write_text('mine')
    assert_one_line_error(_train(f'--outdir={target}/run', *FAST), f'--outdir={target}/run: {target} is a file')
    assert target.read_text() == 'mine' and os.listdir(tmp_path) == ['notes.txt']


# ---- generate_images.py, calculate_metrics.py, reconstruct_phema.py ----


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks a machine without CUDA')
def test_device_cuda_without_cuda_is_one_line(tmp_path):
    result = CliRunner().invoke(generate_images.main, ['--net=x.pkl', f'--grid={tmp_path}/g.png', '--device=cuda'])
    assert_one_line_error(result, '--device=cuda: CUDA is not available here', '--device=cpu')
    result = CliRunner().invoke(
        calculate_metrics.cli, ['calc', f'--images={tmp_path}', '--ref=r.pkl', '--device=cuda:1']
    )
    assert_one_line_error(result, '--device=cuda:1: CUDA is not available here')
    result = CliRunner().invoke(generate_images.main, ['--net=x.pkl', f'--grid={tmp_path}/g.png', '--device=gpu'])
    assert_one_line_error(result, "'gpu' is not a torch device")


def test_relative_net_not_found_names_the_folder_it_is_relative_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(generate_images.main, ['--net=runs/nothing', '--grid=g.png', '--device=cpu'])
    assert_one_line_error(result, f'Network not found: runs/nothing (relative to the current folder {tmp_path})')


def test_net_folder_says_how_it_chose_among_phema_outputs(tmp_path, finished_run):
    run, _output = finished_run
    folder = tmp_path / 'phema'
    folder.mkdir()
    snapshot = open(os.path.join(run, 'network-snapshot-0000000-0.050.pkl'), 'rb').read()
    for std in (0.040, 0.070, 0.100):
        (folder / snapshot_name('phema', 0, std)).write_bytes(snapshot)
    args = [f'--net={folder}', '--seeds=0-1', f'--grid={tmp_path}/g.png', '--device=cpu', '--steps=2']
    result = CliRunner().invoke(generate_images.main, args)
    assert result.exit_code == 0, result.output
    chosen = os.path.join(folder, 'phema-0000000-0.100.pkl')
    assert f'Loading network from {chosen} (of 3 snapshots in {folder}: the highest kimg, then the longest' in (
        result.output
    )


def test_phema_of_a_run_under_one_kimg_explains(tmp_path):
    for std in (0.050, 0.100):
        save_network_pickle(dict(ema=torch.nn.Linear(1, 1)), str(tmp_path / snapshot_name('network-snapshot', 0, std)))
    args = [f'--indir={tmp_path}', f'--outdir={tmp_path / "out"}', '--outstd=0.070']
    result = CliRunner().invoke(reconstruct_phema.main, args)
    assert_one_line_error(result, 'all from the first kimg of training', '--duration=1Ki')
    assert not os.path.exists(tmp_path / 'out')


def test_offline_metrics_list_every_missing_detector_and_the_folders_searched(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    for metric, (names, _url) in list(detectors_mod.DETECTOR_FILES.items()):
        monkeypatch.setitem(detectors_mod.DETECTOR_FILES, metric, (names, f'http://127.0.0.1:9/{names[0]}'))
    monkeypatch.setattr(detectors_mod.dnnlib.util.time, 'sleep', lambda s: None)
    empty = tmp_path / 'detectors'
    empty.mkdir()
    monkeypatch.setenv('EDM2X_DETECTORS', str(empty))
    ref = str(tmp_path / 'ref.pkl')
    save_stats({m: dict(mu=np.zeros(4), sigma=np.eye(4)) for m in ('fid', 'fd_dinov2')}, ref)
    images = _write_pngs(tmp_path / 'images', [(16, 16)] * 2)
    result = CliRunner().invoke(
        calculate_metrics.cli, ['calc', f'--images={images}', f'--ref={ref}', '--num=2', '--device=cpu', '--workers=0']
    )
    assert_one_line_error(
        result,
        f'searched EDM2X_DETECTORS folder(s) {empty}',
        'pt_inception-2015-12-05-6726825d.pth for fid',
        'dinov2_vitl14_pretrain.pth for fd_dinov2',
    )
    downloads = [line for line in result.stderr.splitlines() if line.startswith('Downloading')]
    assert downloads == [
        f'Downloading http://127.0.0.1:9/{name} {again}...'
        for name in ('inception-2015-12-05.pkl', 'dinov2_vitl14_pretrain.pth')
        for again in ('', 'again (ConnectionError; attempt 2 of 3) ')
    ]
    assert f'{empty} hold no dinov2_vitl14_pretrain.pth; downloading it' in result.stderr


# ---- dataset_tool.py, progress bars ----


def test_convert_says_when_resizing_stretches_images(tmp_path):
    source = _write_pngs(tmp_path / 'src', [(24, 16), (16, 16)])
    result = CliRunner().invoke(
        dataset_tool.cli, ['convert', f'--source={source}', f'--dest={tmp_path / "out"}', '--resolution=8']
    )
    assert result.exit_code == 0, result.output
    assert 'Note: 1 images were stretched to 8x8' in result.output and '--transform=center-crop' in result.output
    cropped = CliRunner().invoke(
        dataset_tool.cli,
        ['convert', f'--source={source}', f'--dest={tmp_path / "out2"}', '--resolution=8', '--transform=center-crop'],
    )
    assert cropped.exit_code == 0 and 'stretched' not in cropped.output


def test_progress_bar_in_a_log_file_is_drawn_once_not_per_update():
    import tqdm

    from dnnlib.util import progress_bar

    log, terminal_like = io.StringIO(), io.StringIO()
    for bar in (progress_bar(total=50, file=log), tqdm.tqdm(total=50, file=terminal_like, mininterval=0)):
        with bar:
            for _ in range(50):
                bar.update(1)
    assert log.getvalue().count('\r') <= 2  # the opening draw and the final one
    assert terminal_like.getvalue().count('\r') > 10  # what a log got before


def test_closing_line_of_a_run_without_snapshots_offers_no_sampling_command(tmp_path):
    (tmp_path / 'stats.jsonl').write_text('')
    assert 'wrote no network snapshots' in closing_line(str(tmp_path))
    (tmp_path / 'network-snapshot-0000001-0.100.pkl').write_bytes(b'')
    assert f'python generate_images.py --net={tmp_path}' in closing_line(str(tmp_path))


@pytest.mark.parametrize(
    'network, hint',
    [
        (dict(class_name='training.networks_edm2.Precond'), '--grid={grid}'),
        (dict(class_name='training.networks_text.TextPrecond'), '--grid={grid} --prompt="..."'),
        (dict(class_name='training.networks_text.TextPrecond', lowres=16), '--cascade=NAME --prompt="..."'),
        (dict(class_name='training.clip_guide.CLIPGuide'), '--net=DENOISER --clip={run} --clip-scale=100'),
    ],
)
def test_closing_line_fits_the_kind_of_network(tmp_path, network, hint):
    (tmp_path / 'network-snapshot-0000001-0.100.pkl').write_bytes(b'')
    (tmp_path / 'training_options.json').write_text(json.dumps(dict(network_kwargs=network)))
    line = closing_line(str(tmp_path))
    assert hint.format(run=tmp_path, grid=tmp_path / 'generated.png') in line


def test_closing_line_of_a_stage_of_a_built_in_cascade_names_that_cascade(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # The demo-text cascade's stages are runs/demo-text and runs/demo-sr from here.
    run = tmp_path / 'runs' / 'demo-sr'
    run.mkdir(parents=True)
    (run / 'network-snapshot-0000001-0.100.pkl').write_bytes(b'')
    network = dict(class_name='training.networks_text.TextPrecond', lowres=16)
    (run / 'training_options.json').write_text(json.dumps(dict(network_kwargs=network)))
    assert "the cascade 'demo-text': python generate_images.py --cascade=demo-text" in closing_line(str(run))
