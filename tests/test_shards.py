"""Tar-shard streaming: every sample once per pass over ranks x workers, filters, corrupt members,
resume mid-pass, on-the-fly resizing and one-line errors for bad input."""

import io
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from training import dataset_io, shards
from training.shard_files import ShardError, expand_shards
from training.shard_position import DataPosition
from training.shards import (
    INFO_CORRUPT,
    INFO_READ,
    NUM_INFO_FIXED,
    ShardDataset,
    parse_filter,
)


def _jpg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='jpeg', quality=95)
    return buffer.getvalue()


def write_shards(folder, num_shards=4, per_shard=6, size=8, corrupt=(), sizes=None, cls=None) -> list[dict]:
    """Shards as img2dataset writes them (jpg, txt, json with original_width/height and pwatermark, cls);
    the sample number is stored in pixel (0, 0) of the red channel; `cls` maps sample numbers to another cls
    member (None: none). Returns every sample's metadata."""
    os.makedirs(folder, exist_ok=True)
    metas = []
    idx = 0
    for s in range(num_shards):
        with wds.TarWriter(os.path.join(folder, f'{s:06d}.tar')) as writer:
            for _ in range(per_shard):
                w, h = sizes[idx] if sizes else (size, size)
                image = np.zeros([h, w, 3], dtype=np.uint8)
                image[:, :, 0] = idx * 4  # JPEG keeps a flat colour to within a few levels.
                meta = dict(key=f'{idx:09d}', original_width=w, original_height=h, pwatermark=(idx % 5) / 4)
                if idx % 7 == 3:
                    del meta['pwatermark']
                sample = {
                    '__key__': f'{idx:09d}',
                    'jpg': b'not a jpeg' if idx in corrupt else _jpg(image),
                    'txt': f'sample {idx}'.encode(),
                    'json': json.dumps(meta).encode(),
                    'cls': str(idx % 3).encode(),
                }
                if (cls or {}).get(idx, sample['cls']) is None:
                    del sample['cls']
                else:
                    sample['cls'] = (cls or {}).get(idx, sample['cls'])
                writer.write(sample)
                metas.append(dict(meta, idx=idx))
                idx += 1
    return metas


def _ids(images) -> list[int]:
    return [int(round(float(np.asarray(image)[0].mean()) / 4)) for image in images]


def _one_pass(ds: ShardDataset, slot: int, num_slots: int) -> list[int]:
    """The sample numbers slot `slot` yields in pass 0."""
    out = []
    for image, _label, info in ds.iter_slot(slot, num_slots):
        if info[1] != 0:
            break
        out.extend(_ids([image]))
    return out


@pytest.mark.parametrize('num_shards', [6, 3])
def test_each_sample_is_seen_exactly_once_per_pass_over_two_ranks_of_two_workers(tmp_path, num_shards):
    write_shards(tmp_path, num_shards=num_shards, per_shard=5)
    seen = []
    for rank in range(2):
        ds = ShardDataset(str(tmp_path), shuffle=3, rank=rank, num_replicas=2, random_seed=1)
        for worker in range(2):
            seen += _one_pass(ds, rank * 2 + worker, 4)
    assert sorted(seen) == list(range(num_shards * 5))


def test_filters_keep_exactly_the_samples_that_satisfy_them(tmp_path):
    metas = write_shards(tmp_path, num_shards=1, per_shard=20)
    filters = ['pwatermark<=0.5', 'key!=000000002']
    ds = ShardDataset(str(tmp_path), filters=filters, shuffle=0, loop=False, rank=0, num_replicas=1)
    got = sorted(_ids(image for image, _, _ in ds))
    want = [m['idx'] for m in metas if 'pwatermark' in m and m['pwatermark'] <= 0.5 and m['key'] != '000000002']
    assert got == want
    *_, info = list(ds.iter_slot(0, 1))[-1]  # Counts as of the last sample kept.
    upto = metas[: want[-1] + 1]
    failed_first = sum('pwatermark' not in m or m['pwatermark'] > 0.5 for m in upto)
    assert info[INFO_READ] == len(upto) and info[NUM_INFO_FIXED] == failed_first and info[NUM_INFO_FIXED + 1] == 1


def test_corrupt_members_are_skipped_counted_and_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shards, 'NAMED_CORRUPT', 1)
    write_shards(tmp_path, num_shards=2, per_shard=4, corrupt={1, 6})
    ds = ShardDataset(str(tmp_path), shuffle=0, loop=False, rank=0, num_replicas=1)
    items = list(ds)
    assert sorted(_ids(image for image, _, _ in items)) == [0, 2, 3, 4, 5, 7]
    assert items[-1][2][INFO_CORRUPT] == 2
    (warning,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith('Warning: ')]
    assert any(f'{shard}.tar:00000000{idx}.jpg: unreadable image' in warning for shard, idx in [(0, 1), (1, 6)])
    assert 'further ones of this stream are only counted' in warning and ' at 0x' not in warning


def test_a_wrongly_sized_sample_after_the_first_ones_is_skipped_and_counted_as_corrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, 'PREVIEW_SIZE', 2)  # The samples read at the start, where it stops the start.
    write_shards(tmp_path, num_shards=1, per_shard=6, sizes=[(8, 8), (8, 8), (16, 8), (8, 8), (8, 16), (8, 8)])
    ds = ShardDataset(str(tmp_path), shuffle=0, loop=False, rank=0, num_replicas=1)
    items = list(ds)
    assert _ids(image for image, _, _ in items) == [0, 1, 3, 5]
    assert [int(info[INFO_CORRUPT]) for _, _, info in items] == [0, 0, 1, 2]
    assert [image.shape for image, _, _ in items] == [(3, 8, 8)] * 4


def test_labels_and_captions_come_from_cls_and_txt(tmp_path):
    write_shards(tmp_path, num_shards=1, per_shard=5)
    labelled = ShardDataset(str(tmp_path), use_labels=True, shuffle=0, loop=False, rank=0, num_replicas=1)
    assert labelled.label_dim == 3
    for image, label, _ in labelled:
        assert label.tolist() == np.eye(3)[_ids([image])[0] % 3].tolist()
    captioned = ShardDataset(str(tmp_path), use_captions=True, shuffle=0, loop=False, rank=0, num_replicas=1)
    assert [caption for _, caption, _ in captioned] == [f'sample {i}' for i in range(5)]


def test_a_sample_without_a_class_label_or_with_a_malformed_one_is_one_line_naming_it(tmp_path):
    write_shards(tmp_path / 'missing', num_shards=2, per_shard=3, cls={4: None})
    for label_dim in (None, 3):  # Read from every shard, or given (then checked as samples stream).
        with pytest.raises(ShardError, match=r'000001\.tar:000000004: no cls member') as info:
            ShardDataset(str(tmp_path / 'missing'), use_labels=True, label_dim=label_dim, rank=0, num_replicas=1)
        assert '\n' not in str(info.value)
    kept = ShardDataset(
        str(tmp_path / 'missing'),
        use_labels=True,
        filters=['pwatermark<1'],
        shuffle=0,
        loop=False,
        rank=0,
        num_replicas=1,
    )  # Sample 4 has pwatermark 1: filtered out, its missing label does not matter.
    assert sorted((_ids([image])[0], label.tolist()) for image, label, _ in kept) == [
        (i, np.eye(3)[i % 3].tolist()) for i in (0, 1, 2, 5)
    ]
    write_shards(tmp_path / 'word', num_shards=2, per_shard=3, cls={5: b'dog'})
    with pytest.raises(ShardError, match=r"000001\.tar:000000005\.cls: 'dog' is not a class index") as info:
        ShardDataset(str(tmp_path / 'word'), use_labels=True, rank=0, num_replicas=1)
    assert '\n' not in str(info.value)


def _consume(ds: ShardDataset, num_slots: int, num: int, position: DataPosition) -> list[tuple[int, int, int]]:
    """`num` samples taken round-robin from the slots, as the DataLoader does: (slot, pass, sample number)."""
    streams = [ds.iter_slot(slot, num_slots) for slot in range(num_slots)]
    out = []
    for k in range(num):
        image, _label, info = next(streams[k % num_slots])
        position.update(torch.as_tensor(info)[None])
        out.append((k % num_slots, int(info[1]), _ids([image])[0]))
    return out


def test_a_run_stopped_mid_pass_and_resumed_consumes_the_same_samples(tmp_path):
    write_shards(tmp_path, num_shards=4, per_shard=6, corrupt={9})
    make = lambda: ShardDataset(str(tmp_path), shuffle=4, random_seed=5, rank=0, num_replicas=1)  # noqa: E731
    whole = _consume(make(), 2, 60, DataPosition([], 2, 'x'))
    first = DataPosition([], 2, 'x')
    part = _consume(make(), 2, 15, first)
    resumed_ds = make()
    second = DataPosition([], 2, 'x')
    resumed_ds.set_position(second.restore(first.state()))
    rest = _consume(resumed_ds, 2, 25, second)
    for slot in range(2):  # Each worker's stream continues where it stopped.
        mine = [(p, i) for s, p, i in part + rest if s == slot]
        assert mine == [(p, i) for s, p, i in whole if s == slot][: len(mine)]
    pass0 = [i for _s, p, i in part + rest if p == 0]
    assert sorted(pass0) == [i for i in range(24) if i != 9]


def test_a_changed_worker_count_restarts_the_pass_with_a_note(tmp_path, capsys):
    position = DataPosition([], 3, 'x')
    assert position.restore(dict(num_slots=2, fingerprint='x', slots={0: (4, 3), 1: (5, 1)})) == {
        0: (4, 0),
        1: (4, 0),
        2: (4, 0),
    }
    assert 'restarts pass 4' in capsys.readouterr().out


def test_images_are_resized_on_the_fly_by_the_convert_transform_and_small_ones_dropped(tmp_path):
    sizes = [(24, 16), (12, 12), (40, 20)]
    write_shards(tmp_path, num_shards=1, per_shard=3, sizes=sizes)
    ds = ShardDataset(str(tmp_path), resolution=16, shuffle=0, loop=False, rank=0, num_replicas=1)
    items = list(ds)
    assert [image.shape for image, _, _ in items] == [(3, 16, 16)] * 2
    with wds.WebDataset(str(tmp_path / '000000.tar'), shardshuffle=False) as reference:
        decoded = [dataset_io.decode_image(s['jpg'], 'x') for s in reference]
    want = dataset_io.make_transform('center-crop', 16, 16)(decoded[2])
    np.testing.assert_array_equal(items[1][0], want.transpose(2, 0, 1))
    upscaled = ShardDataset(str(tmp_path), resolution=16, upscale=True, shuffle=0, loop=False, rank=0, num_replicas=1)
    assert len(list(upscaled)) == 3


def test_shard_specs_brace_folder_and_list_file_name_the_same_shards(tmp_path):
    write_shards(tmp_path, num_shards=3, per_shard=1)
    (tmp_path / 'list.txt').write_text('000000.tar\n000001.tar\n000002.tar\n')
    brace = expand_shards(str(tmp_path / '{000000..000002}.tar'))
    assert brace == expand_shards(str(tmp_path)) == expand_shards(str(tmp_path / 'list.txt'))


@pytest.mark.parametrize(
    'make, message',
    [
        (lambda p: ShardDataset(str(p / '{000005..000009}.tar')), 'matches no file'),
        (lambda p: (p / 'bad.tar').write_bytes(b'x' * 700) and ShardDataset(str(p / 'bad.tar')), 'not a readable tar'),
        (lambda p: parse_filter('original_width>>512'), 'cannot parse filter'),
        (lambda p: parse_filter('original_width 512'), 'cannot parse filter'),
        (lambda p: parse_filter('original_width>=big'), 'needs a number'),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, make, message):
    with pytest.raises(ShardError, match=message) as info:
        make(tmp_path)
    assert '\n' not in str(info.value)


def test_mixed_sizes_without_resolution_is_one_clear_line(tmp_path):
    write_shards(tmp_path, num_shards=1, per_shard=2, sizes=[(8, 8), (16, 8)])
    with pytest.raises(ShardError, match='mixed sizes are resized as they stream with --resolution') as info:
        ShardDataset(str(tmp_path), shuffle=0)
    assert '\n' not in str(info.value)


def test_a_data_loader_with_two_workers_reads_each_sample_once(tmp_path):
    write_shards(tmp_path, num_shards=4, per_shard=3)
    ds = ShardDataset(str(tmp_path), shuffle=2, loop=False, rank=0, num_replicas=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    seen = [i for images, _labels, _info in loader for i in _ids(images.numpy())]
    assert sorted(seen) == list(range(12))


def test_a_worker_left_without_samples_is_one_clear_line(tmp_path):
    write_shards(tmp_path, num_shards=1, per_shard=1)
    ds = ShardDataset(str(tmp_path), shuffle=0, rank=0, num_replicas=1)
    assert _ids(image for image, _, _ in [next(ds.iter_slot(0, 2))]) == [0]
    with pytest.raises(ShardError, match='use fewer --workers'):
        next(ds.iter_slot(1, 2))


def test_xflip_mirrors_about_half_the_samples_and_nothing_else(tmp_path):
    ramp = np.tile(np.arange(0, 64, 8, dtype=np.uint8)[None, :, None], [8, 1, 3])
    with wds.TarWriter(str(tmp_path / '000000.tar')) as writer:
        for idx in range(40):
            writer.write({'__key__': f'{idx:09d}', 'png': dataset_io.encode_png(ramp + idx)})
    ds = ShardDataset(str(tmp_path), xflip=True, shuffle=0, loop=False, rank=0, num_replicas=1)
    flipped = 0
    for idx, (image, _, _) in enumerate(ds):
        plain = (ramp + idx).transpose(2, 0, 1)
        assert np.array_equal(image, plain) or np.array_equal(image, plain[:, :, ::-1])
        flipped += not np.array_equal(image, plain)
    assert 8 <= flipped <= 32
