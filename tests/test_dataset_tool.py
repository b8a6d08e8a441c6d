import json
import os
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import assert_one_line_error
from PIL import Image

import dataset_tool
from training import dataset_io, shapes
from training.dataset import ImageFolderDataset


def run(*args: str):
    return CliRunner().invoke(dataset_tool.cli, list(args))


def save(path, image: np.ndarray, mode: str | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).convert(mode or Image.fromarray(image).mode).save(path)


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=[h, w, 3], dtype=np.uint8)


def test_synth_writes_stored_zip_with_labels_and_captions(tmp_path):
    dest = tmp_path / 'shapes.zip'
    result = run('synth', f'--dest={dest}', '--resolution=8', '--max-images=6', '--seed=3')
    assert result.exit_code == 0, result.output
    assert os.listdir(tmp_path) == ['shapes.zip']  # no temporary files left behind
    with zipfile.ZipFile(dest) as z:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
        metadata = json.loads(z.read('dataset.json'))
    assert [label for _, label in metadata['labels']] == [shapes.make_image(3, i, 8)[1] for i in range(6)]
    assert [caption for _, caption in metadata['captions']] == [shapes.make_image(3, i, 8)[2] for i in range(6)]
    assert len(ImageFolderDataset(str(dest), use_labels=True)) == 6


def test_synth_hold_out_leaves_every_matching_combination_out_and_keeps_the_rest(tmp_path):
    held = ['red circle', 'on a blue background, at the top']
    dest = tmp_path / 'held.zip'
    args = ['synth', f'--dest={dest}', '--resolution=8', '--max-images=600', '--seed=3']
    assert run(*args, *[f'--hold-out={h}' for h in held]).exit_code == 0
    with zipfile.ZipFile(dest) as z:
        captions = [caption for _, caption in json.loads(z.read('dataset.json'))['captions']]
    assert len(captions) == 600
    assert not any('red circle' in c or ('blue background, at the top' in c) for c in captions)
    assert any('red' in c for c in captions) and any('circle' in c for c in captions)
    # Every other scene of the seed is kept, in order: the data is the unfiltered stream minus the held-out.
    stream = [shapes.make_image(3, i, 8)[2] for i in range(900)]
    assert captions == [c for c in stream if not any(h in c for h in held)][:600]
    assert_one_line_error(run('synth', f'--dest={tmp_path / "none.zip"}', '--hold-out=a'), 'leaves no caption')
    assert not (tmp_path / 'none.zip').exists()


def test_convert_folder_labels_from_subfolders_and_captions_from_sidecars(tmp_path):
    src = tmp_path / 'src'
    save(src / 'zebra' / 'z1.png', noise(6, 6, 1))
    save(src / 'ant' / 'a1.jpg', noise(6, 6, 2))
    save(src / 'ant' / 'a2.png', noise(6, 6, 3), mode='L')
    save(src / 'moth' / 'm1.png', noise(6, 6, 4), mode='RGBA')
    (src / 'ant' / 'a1.txt').write_text('an ant\n')
    dest = tmp_path / 'out.zip'
    result = run('convert', f'--source={src}', f'--dest={dest}')
    assert result.exit_code == 0, result.output
    dataset = ImageFolderDataset(str(dest), use_labels=True)
    # Sorted paths: ant/a1.jpg, ant/a2.png, moth/m1.png, zebra/z1.png; classes sorted: ant 0, moth 1, zebra 2.
    assert [int(dataset.get_label(i).argmax()) for i in range(4)] == [0, 0, 1, 2]
    assert [dataset.get_caption(i) for i in range(4)] == ['an ant', '', '', '']
    assert dataset.image_shape == [3, 6, 6]
    gray = dataset[1][0]
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])
    assert np.array_equal(dataset[2][0], noise(6, 6, 4).transpose(2, 0, 1))
    assert np.array_equal(dataset[3][0], noise(6, 6, 1).transpose(2, 0, 1))


def test_convert_says_why_class_folders_gave_no_labels_when_an_image_lies_outside_them(tmp_path):
    src = tmp_path / 'src'
    for name in ('ant/a1.png', 'moth/m1.png', 'top.png'):
        save(src / name, noise(4, 4))
    result = run('convert', f'--source={src}', f'--dest={tmp_path / "out.zip"}')
    assert result.exit_code == 0, result.output
    assert 'Note: 1 of 3 images (top.png) lie outside the sub-folders' in result.output
    assert not ImageFolderDataset(str(tmp_path / 'out.zip'), use_labels=True).has_labels
    os.remove(src / 'top.png')
    result = run('convert', f'--source={src}', f'--dest={tmp_path / "labelled.zip"}')
    assert (
        'Note' not in result.output and ImageFolderDataset(str(tmp_path / 'labelled.zip'), use_labels=True).has_labels
    )


@pytest.mark.parametrize('mapping', ['csv', 'json'])
def test_convert_takes_captions_from_a_csv_or_json_mapping_over_sidecars(tmp_path, mapping):
    src = tmp_path / 'src'
    save(src / 'a.png', noise(4, 4, 1))
    save(src / 'b.png', noise(4, 4, 2))
    save(src / 'c.png', noise(4, 4, 3))
    (src / 'a.txt').write_text('from the sidecar')
    (src / 'c.txt').write_text('kept sidecar')
    captions = {'a.png': 'a red, "quoted" cat', 'b.png': 'ünïcode 猫'}
    path = tmp_path / f'captions.{mapping}'
    if mapping == 'json':
        path.write_text(json.dumps(captions), encoding='utf-8')
    else:
        path.write_text('file,caption\na.png,"a red, ""quoted"" cat"\nb.png,ünïcode 猫\n', encoding='utf-8')
    result = run('convert', f'--source={src}', f'--dest={tmp_path / "out"}', f'--captions={path}')
    assert result.exit_code == 0, result.output
    dataset = ImageFolderDataset(str(tmp_path / 'out'), use_captions=True)
    assert [dataset[i][1] for i in range(3)] == ['a red, "quoted" cat', 'ünïcode 猫', 'kept sidecar']
    assert_one_line_error(
        run('convert', f'--source={src}', f'--dest={tmp_path / "x"}', f'--captions={tmp_path / "no.csv"}'), 'no.csv'
    )


def test_convert_zip_with_dataset_json_round_trips(tmp_path):
    src, dest = tmp_path / 'src.zip', tmp_path / 'copy'
    dataset_tool.write_synthetic_dataset(str(src), resolution=8, num_images=5, seed=1, progress=False)
    result = run('convert', f'--source={src}', f'--dest={dest}', '--max-images=4')
    assert result.exit_code == 0, result.output
    a, b = ImageFolderDataset(str(src), use_labels=True), ImageFolderDataset(str(dest), use_labels=True)
    assert len(b) == 4
    for i in range(4):
        assert np.array_equal(a[i][0], b[i][0]) and np.array_equal(a[i][1], b[i][1])
        assert a.get_caption(i) == b.get_caption(i)


@pytest.mark.parametrize('height, width, factor', [(48, 64, 4), (32, 41, 2), (33, 40, 2)])
def test_center_crop_dhariwal_matches_independent_computation(height, width, factor):
    # Constant factor x factor blocks make the box halvings exact: the short side halves while it is
    # >= 2 * size (64 -> 32 -> stop, 66 -> 33 -> stop), leaving `base` to resize by bicubic and crop.
    base = noise(height, width)
    image = base.repeat(factor, axis=0).repeat(factor, axis=1)
    size = 32
    out_w = round(width * size / height)
    resized = np.array(Image.fromarray(base).resize((out_w, size), Image.Resampling.BICUBIC))
    left = (out_w - size) // 2
    assert np.array_equal(dataset_io.center_crop_dhariwal(image, size), resized[:, left : left + size])


def test_center_crop_dhariwal_without_halving_and_odd_sizes():
    image = noise(45, 61)  # short side < 2*32: only the bicubic resize
    width = round(61 * 32 / 45)
    resized = np.array(Image.fromarray(image).resize((width, 32), Image.Resampling.BICUBIC))
    assert np.array_equal(dataset_io.center_crop_dhariwal(image, 32), resized[:, (width - 32) // 2 :][:, :32])
    assert dataset_io.center_crop_dhariwal(noise(301, 133), 16).shape == (16, 16, 3)


def test_center_crop_and_center_crop_wide_keep_the_middle():
    image = noise(20, 40)
    square = dataset_io.make_transform('center-crop', 10, 10)(image)
    expected = np.array(Image.fromarray(image[:, 10:30]).resize((10, 10), Image.Resampling.LANCZOS))
    assert np.array_equal(square, expected)
    wide = dataset_io.make_transform('center-crop-wide', 16, 4)(image)
    expected = np.array(Image.fromarray(image[5:15, :]).resize((16, 4), Image.Resampling.LANCZOS))
    assert np.array_equal(wide, expected)


def test_convert_resolution_and_transform_via_cli(tmp_path):
    save(tmp_path / 'src' / 'a.png', noise(30, 50))
    save(tmp_path / 'src' / 'b.png', noise(40, 20))
    dest = tmp_path / 'out.zip'
    result = run(
        'convert',
        f'--source={tmp_path / "src"}',
        f'--dest={dest}',
        '--resolution=16',
        '--transform=center-crop-dhariwal',
    )
    assert result.exit_code == 0, result.output
    dataset = ImageFolderDataset(str(dest))
    assert dataset.image_shape == [3, 16, 16] and not dataset.has_labels
    expected = dataset_io.center_crop_dhariwal(noise(40, 20), 16)
    assert np.array_equal(dataset[1][0], expected.transpose(2, 0, 1))


def test_parse_resolution():
    assert dataset_io.parse_resolution('64') == (64, 64)
    assert dataset_io.parse_resolution('512x256') == (512, 256)
    for bad in ('', '0', 'x64', '64x', '6.4', '-3'):
        with pytest.raises(ValueError):
            dataset_io.parse_resolution(bad)


# ---- bad inputs: one clear error line, no traceback, nothing left at --dest ----


def test_corrupt_source_zip(tmp_path):
    src = tmp_path / 'broken.zip'
    src.write_bytes(b'garbage')
    result = run('convert', f'--source={src}', f'--dest={tmp_path / "out.zip"}')
    assert_one_line_error(result, 'broken.zip', 'not a folder or a valid ZIP')
    assert not (tmp_path / 'out.zip').exists()


def test_corrupt_source_image_is_named_and_no_partial_zip(tmp_path):
    save(tmp_path / 'src' / 'a.png', noise(8, 8))
    (tmp_path / 'src' / 'b.png').write_bytes(b'\x89PNG truncated')
    result = run('convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out.zip"}')
    assert_one_line_error(result, 'b.png', 'unreadable image')
    assert sorted(os.listdir(tmp_path)) == ['src']


def test_mixed_sizes_without_resolution_name_the_file(tmp_path):
    save(tmp_path / 'src' / 'a.png', noise(8, 8))
    save(tmp_path / 'src' / 'b.png', noise(8, 12))
    result = run('convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out"}')
    assert_one_line_error(result, 'b.png', '12x8', '--resolution')
    assert sorted(os.listdir(tmp_path)) == ['src']  # the temporary folder was removed


def test_missing_label_in_source_dataset_json(tmp_path):
    save(tmp_path / 'src' / 'a.png', noise(8, 8))
    save(tmp_path / 'src' / 'b.png', noise(8, 8))
    (tmp_path / 'src' / 'dataset.json').write_text(json.dumps({'labels': [['a.png', 1]]}))
    result = run('convert', f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out.zip"}')
    assert_one_line_error(result, 'dataset.json', 'no label for b.png')


def test_option_errors(tmp_path):
    save(tmp_path / 'src' / 'a.png', noise(8, 8))
    src = f'--source={tmp_path / "src"}'
    assert_one_line_error(
        run('convert', src, f'--dest={tmp_path / "o.zip"}', '--transform=center-crop'), '--resolution'
    )
    assert_one_line_error(run('convert', src, f'--dest={tmp_path / "o.zip"}', '--resolution=8y'), '--resolution=8y')
    assert_one_line_error(run('convert', src, f'--dest={tmp_path / "o.zip"}', '--resolution=0'), '--resolution=0')
    result = run('synth', f'--dest={tmp_path / "big.zip"}', '--resolution=100000', '--max-images=1')
    assert result.exit_code == 2 and '4096' in result.output and not (tmp_path / 'big.zip').exists()
    assert_one_line_error(
        run('convert', src, f'--dest={tmp_path / "o.zip"}', '--resolution=16x8', '--transform=center-crop'),
        'center-crop-wide',
    )
    assert_one_line_error(run('convert', f'--source={tmp_path / "none"}', f'--dest={tmp_path / "o.zip"}'), 'none')
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('')
    assert_one_line_error(run('synth', f'--dest={tmp_path / "full"}', '--max-images=2'), 'full', 'not an empty folder')
    (tmp_path / 'kept.zip').write_bytes(b'a dataset made earlier')
    for args in (['synth', '--max-images=2'], ['convert', src]):
        assert_one_line_error(run(*args, f'--dest={tmp_path / "kept.zip"}'), 'kept.zip: already exists')
    assert (tmp_path / 'kept.zip').read_bytes() == b'a dataset made earlier'
    result = run('synth', f'--dest={tmp_path / "s.zip"}', '--max-images=lots')
    assert result.exit_code == 2 and 'lots' in result.output and 'Traceback' not in result.output


def test_library_raises_its_own_error_type_and_the_cli_turns_it_into_one_line(tmp_path):
    with pytest.raises(dataset_io.DatasetFileError, match=r'none: no such folder or ZIP file'):
        dataset_io.ImageSource(str(tmp_path / 'none'))
    with pytest.raises(dataset_io.DatasetFileError, match=r'b\.png: unreadable image'):
        dataset_io.decode_image(b'\x89PNG truncated', 'b.png')
    assert_one_line_error(run('convert', f'--source={tmp_path / "none"}', f'--dest={tmp_path / "o.zip"}'), 'none')


@pytest.mark.parametrize(
    'args',
    [
        ['synth', '--dest={file}/x.zip', '--resolution=8', '--max-images=2'],
        ['synth', '--dest={file}/sub/x', '--resolution=8', '--max-images=2'],
        ['convert', '--source={data}', '--dest={file}/x.zip'],
        ['shards', '--source={data}', '--dest={file}/shards'],
        ['encode', '--source={data}', '--dest={file}/x.zip', '--model-url={tmp}/no-vae', '--device=cpu'],
        ['encode', '--source={data}', '--dest={data}', '--model-url={tmp}/no-vae', '--device=cpu'],
    ],
)
def test_a_dest_that_cannot_be_made_is_one_line_before_any_work(tmp_path, args):
    file, data = tmp_path / 'file', tmp_path / 'data.zip'
    file.write_text('kept')
    assert run('synth', f'--dest={data}', '--resolution=8', '--max-images=2').exit_code == 0
    before = data.read_bytes()
    result = run(*[a.format(file=file, data=data, tmp=tmp_path) for a in args])
    assert_one_line_error(result, args[2 if args[0] != 'synth' else 1].split('=')[1].format(file=file, data=data))
    assert 'VAE' not in result.output and file.read_text() == 'kept' and data.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ['data.zip', 'file']
