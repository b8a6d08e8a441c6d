import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import dataset_tool
from training import shapes
from training.dataset import DatasetError, ImageFolderDataset
from training.dataset_io import SOURCE_EXTENSIONS

NUM, RES, SEED = 12, 8, 5


@pytest.fixture(scope='module')
def synth_paths(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp('synth')
    zip_path, dir_path = str(root / 'shapes.zip'), str(root / 'shapes')
    for dest in (zip_path, dir_path):
        dataset_tool.write_synthetic_dataset(dest, resolution=RES, num_images=NUM, seed=SEED, progress=False)
    return zip_path, dir_path


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='png')
    return buffer.getvalue()


def write_folder(root, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)
    return str(root)


def test_synthetic_round_trip_gives_generator_images_labels_and_captions(synth_paths):
    dataset = ImageFolderDataset(synth_paths[0], use_labels=True)
    assert len(dataset) == NUM and dataset.image_shape == [3, RES, RES] and dataset.resolution == RES
    assert dataset.label_dim == 1 + max(shapes.make_image(SEED, i, RES)[1] for i in range(NUM))
    assert dataset.has_labels and dataset.has_captions and dataset.name == 'shapes'
    for i in range(NUM):
        expected_image, expected_label, expected_caption = shapes.make_image(SEED, i, RES)
        image, label = dataset[i]
        assert image.dtype == np.uint8 and np.array_equal(image, expected_image.transpose(2, 0, 1))
        assert label.dtype == np.float32 and label.sum() == 1 and label[expected_label] == 1
        assert dataset.get_caption(i) == expected_caption


def test_folder_and_zip_give_identical_items(synth_paths):
    a, b = (ImageFolderDataset(path, use_labels=True) for path in synth_paths)
    assert len(a) == len(b) and a.label_shape == b.label_shape
    for i in range(len(a)):
        assert np.array_equal(a[i][0], b[i][0]) and np.array_equal(a[i][1], b[i][1])
        assert a.get_caption(i) == b.get_caption(i)


def test_xflip_appends_mirrored_copies(synth_paths):
    plain = ImageFolderDataset(synth_paths[0], use_labels=True)
    flipped = ImageFolderDataset(synth_paths[0], use_labels=True, xflip=True)
    assert len(flipped) == 2 * NUM
    for i in range(NUM):
        assert np.array_equal(flipped[i][0], plain[i][0])
        assert np.array_equal(flipped[NUM + i][0], plain[i][0][:, :, ::-1])
        assert np.array_equal(flipped[NUM + i][1], plain[i][1])
        assert flipped.get_details(NUM + i).xflip and not flipped.get_details(i).xflip


def test_max_size_keeps_a_seeded_subset(synth_paths):
    full = ImageFolderDataset(synth_paths[0])
    subsets = [
        [ImageFolderDataset(synth_paths[0], max_size=5, random_seed=seed).get_details(i).raw_idx for i in range(5)]
        for seed in (0, 0, 1)
    ]
    assert subsets[0] == subsets[1] != subsets[2]
    assert len(set(subsets[0])) == 5 and subsets[0] == sorted(subsets[0])
    small = ImageFolderDataset(synth_paths[0], max_size=5, random_seed=0)
    for i in range(5):
        assert np.array_equal(small[i][0], full[subsets[0][i]][0])
    assert len(ImageFolderDataset(synth_paths[0], max_size=100)) == NUM


def test_without_labels_or_captions(tmp_path):
    image = np.zeros([4, 4, 3], np.uint8)
    dataset = ImageFolderDataset(write_folder(tmp_path, {'a.png': png_bytes(image)}), use_labels=True)
    assert dataset.label_shape == [0] and not dataset.has_labels and not dataset.has_captions
    assert dataset[0][1].shape == (0,) and dataset.get_caption(0) == ''
    assert ImageFolderDataset(str(tmp_path)).label_dim == 0


def test_npy_latents_load_as_float32_chw(tmp_path):
    arrays = [np.random.default_rng(i).normal(size=[8, 4, 4]).astype(np.float32) for i in range(3)]
    files = {}
    for i, array in enumerate(arrays):
        buffer = io.BytesIO()
        np.save(buffer, array)
        files[f'x/{i}.npy'] = buffer.getvalue()
    files['dataset.json'] = json.dumps({'labels': [[f'x/{i}.npy', i] for i in range(3)]}).encode()
    dataset = ImageFolderDataset(write_folder(tmp_path, files), use_labels=True)
    assert dataset.image_shape == [8, 4, 4] and dataset.label_dim == 3
    for i in range(3):
        image, label = dataset[i]
        assert image.dtype == np.float32 and np.array_equal(image, arrays[i]) and label.argmax() == i


def test_pickled_dataset_reads_zip_in_worker_processes(synth_paths):
    dataset = ImageFolderDataset(synth_paths[0], use_labels=True)
    expected = torch.stack([torch.from_numpy(dataset[i][0]) for i in range(NUM)])
    restored = pickle.loads(pickle.dumps(dataset))
    assert np.array_equal(restored[3][0], dataset[3][0])
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    assert torch.equal(torch.cat([images for images, _labels in loader]), expected)


# ---- bad inputs: each raises DatasetError naming the offending file ----


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match='nothing-here'):
        ImageFolderDataset(str(tmp_path / 'nothing-here'))
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(DatasetError, match='empty.*no image or NPY'):
        ImageFolderDataset(str(empty))


def test_corrupt_zip(tmp_path):
    path = tmp_path / 'broken.zip'
    path.write_bytes(b'PK\x03\x04 this is not really a zip file')
    with pytest.raises(DatasetError, match='broken.zip.*not a folder or a valid ZIP'):
        ImageFolderDataset(str(path))


def test_unreadable_image_is_named(tmp_path):
    good = png_bytes(np.zeros([4, 4, 3], np.uint8))
    root = write_folder(tmp_path, {'a.png': good, 'b.png': good[:30]})
    dataset = ImageFolderDataset(root)
    assert np.array_equal(dataset[0][0], np.zeros([3, 4, 4], np.uint8))
    with pytest.raises(DatasetError, match=r'b\.png: unreadable image'):
        dataset[1]
    with pytest.raises(DatasetError, match=r'b\.png'):
        dataset.validate()


def test_mixed_sizes_are_named_on_access_and_by_validate(tmp_path):
    files = {f'{i}.png': png_bytes(np.zeros([4, 4, 3], np.uint8)) for i in range(3)}
    files['2.png'] = png_bytes(np.zeros([4, 6, 3], np.uint8))
    dataset = ImageFolderDataset(write_folder(tmp_path, files))
    dataset[0], dataset[1]
    with pytest.raises(DatasetError, match=r'2\.png: image is 6x4 with 3 channels.*0\.png is 4x4'):
        dataset[2]
    with pytest.raises(DatasetError, match=r'2\.png'):
        dataset.validate()


def test_missing_and_malformed_labels(tmp_path):
    image = png_bytes(np.zeros([4, 4, 3], np.uint8))
    files = {'a.png': image, 'b.png': image, 'dataset.json': json.dumps({'labels': [['a.png', 0]]}).encode()}
    root = write_folder(tmp_path / 'missing', files)
    with pytest.raises(DatasetError, match=r'dataset\.json: no label for b\.png'):
        ImageFolderDataset(root, use_labels=True)
    assert len(ImageFolderDataset(root, use_labels=False)) == 2
    files['dataset.json'] = json.dumps({'labels': [['a.png', 0], ['b.png', 'cat']]}).encode()
    with pytest.raises(DatasetError, match=r'label of b\.png'):
        ImageFolderDataset(write_folder(tmp_path / 'malformed', files), use_labels=True)


def test_requested_resolution_must_match(synth_paths):
    with pytest.raises(DatasetError, match=f'img00000000.png: image is {RES}x{RES}.*resolution 16'):
        ImageFolderDataset(synth_paths[0], resolution=16)


def test_corrupt_member_inside_zip_is_named(tmp_path):
    path = tmp_path / 'data.zip'
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as z:
        z.writestr('a.png', png_bytes(np.zeros([4, 4, 3], np.uint8)))
        z.writestr('b.png', b'not a png')
    dataset = ImageFolderDataset(str(path))
    with pytest.raises(DatasetError, match=r'data\.zip:b\.png: unreadable image'):
        dataset.validate()


def test_16bit_grayscale_keeps_its_high_byte_in_folder_datasets_and_the_tools(tmp_path):
    values = np.random.default_rng(0).integers(0, 1 << 16, [5, 4]).astype(np.uint16)
    expected = (values // 256).astype(np.uint8)
    Image.fromarray(values).save(tmp_path / 'a.png')
    Image.fromarray(expected).save(tmp_path / 'b.png')  # 8-bit grayscale: the same shape and pixels
    assert Image.open(tmp_path / 'a.png').mode == 'I;16'
    dataset = ImageFolderDataset(str(tmp_path))
    assert dataset.image_shape == [1, 5, 4] and dataset.validate(decode=False) == dataset.validate() == []
    assert np.array_equal(dataset[0][0][0], expected) and np.array_equal(dataset[1][0][0], expected)

    big_endian, floats = io.BytesIO(), io.BytesIO()
    Image.frombytes('I;16B', (4, 5), values.astype('>u2').tobytes()).save(big_endian, format='tiff')
    Image.fromarray(values / 7.0).save(floats, format='tiff')
    for data in ((tmp_path / 'a.png').read_bytes(), big_endian.getvalue()):
        assert np.array_equal(dataset_tool.decode_image(data, 'x'), np.stack([expected] * 3, axis=-1))
    with pytest.raises(dataset_tool.DatasetFileError, match=r'^c\.tif: unreadable image \(floating-point pixels'):
        dataset_tool.decode_image(floats.getvalue(), 'c.tif')


@pytest.mark.parametrize('kind', ['folder', 'zip'])
def test_every_image_type_convert_reads_loads_from_folders_and_zips(tmp_path, kind):
    rng = np.random.default_rng(1)
    files = {}
    for name in ('a.jpg', 'b.JPEG', 'c.webp', 'd.bmp', 'e.gif', 'f.tiff', 'g.tif', 'h.png'):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, [6, 5, 3]).astype(np.uint8)).save(
            buffer, format=Image.registered_extensions()[os.path.splitext(name)[1].lower()]
        )
        files[name] = buffer.getvalue()
    assert sorted(os.path.splitext(name)[1].lower() for name in files) == sorted(SOURCE_EXTENSIONS)
    if kind == 'zip':
        root = str(tmp_path / 'data.zip')
        with zipfile.ZipFile(root, 'w') as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        root = write_folder(tmp_path, files)
    dataset = ImageFolderDataset(root)
    assert len(dataset) == len(files) and dataset.validate(decode=False) == []
    for idx, data in enumerate(files.values()):
        expected = np.array(Image.open(io.BytesIO(data)).convert('RGB')).transpose(2, 0, 1)
        assert np.array_equal(dataset[idx][0], expected)
    if kind == 'folder':
        np.save(tmp_path / 'i.npy', np.zeros([3, 6, 5], np.float32))
        with pytest.raises(DatasetError, match='mixes images and NPY files'):
            ImageFolderDataset(root)
