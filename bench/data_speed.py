"""Data-loading speed and memory: decoded samples/s of one worker streaming tar shards (PNG and JPEG at 64²
and 256², float32 latents), and resident memory while a loader streams many small samples.

python bench/data_speed.py                          # speed table
python bench/data_speed.py --preset=demo            # ... beside the preset's training rate, and the workers it needs
python bench/data_speed.py --train-img-s=900        # ... or beside a training rate measured elsewhere (a GPU)
python bench/data_speed.py --memory --num=100000    # RSS after 1k and after --num samples, shards and ZIP
"""

import io
import os
import sys
import tempfile
import time

import click
import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.click_types import FiniteFloatRange
from training.dataset import ImageFolderDataset  # noqa: E402
from training.dataset_io import DatasetWriter, item_relpath  # noqa: E402
from training.shard_writer import shard_name, write_shard  # noqa: E402
from training.shards import ShardDataset  # noqa: E402
from training.throughput import ThroughputError, time_training_steps  # noqa: E402


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({'quality': 90} if fmt == 'jpeg' else {}))
    return buffer.getvalue()


def _samples(kind: str, size: int, num: int, rng: np.random.Generator):
    """Smooth random images (compress like photos, unlike noise), or 8-channel latents of size/8."""
    for idx in range(num):
        sample = {'__key__': f'{idx:09d}', 'json': b'{"original_width": %d}' % size}
        if kind == 'npy':
            buffer = io.BytesIO()
            np.save(buffer, rng.standard_normal([8, size // 8, size // 8], dtype=np.float32))
            sample['npy'] = buffer.getvalue()
        else:
            coarse = rng.integers(0, 256, [size // 8, size // 8, 3], dtype=np.uint8)
            image = np.array(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
            sample['jpg' if kind == 'jpeg' else 'png'] = _encoded(image, kind)
        yield sample


def _write(folder: str, kind: str, size: int, num: int, per_shard: int) -> str:
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    samples = _samples(kind, size, num, rng)
    for s in range(-(-num // per_shard)):
        write_shard(os.path.join(folder, shard_name(s)), (x for _, x in zip(range(per_shard), samples)))
    return folder


def _rate(path: str, num: int) -> float:
    """Samples/s of one worker (slot 0 of 1) over one pass, decode included, shuffle buffer of 1000."""
    ds = ShardDataset(path, shuffle=1000, loop=False, rank=0, num_replicas=1)
    start, count = time.perf_counter(), 0
    for _ in ds.iter_slot(0, 1):
        count += 1
    return count / (time.perf_counter() - start)


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _memory(root: str, num: int) -> None:
    """RSS of this process after 1k samples and after `num`, streaming 8x8 PNGs from shards and from a ZIP."""
    shards = _write(os.path.join(root, 'mem-shards'), 'png', 8, num, 10000)
    ds = ShardDataset(shards, shuffle=1000, rank=0, num_replicas=1)
    for name, stream in (('shards', (x for x in ds.iter_slot(0, 1))), ('zip', None)):
        if stream is None:
            zip_path = os.path.join(root, 'mem.zip')
            with DatasetWriter(zip_path) as writer:
                for idx in range(num):
                    writer.add_image(item_relpath(idx), np.full([8, 8, 3], idx % 256, dtype=np.uint8))
            dataset = ImageFolderDataset(zip_path)
            stream = (dataset[i] for i in range(num))
        for idx, _ in enumerate(stream):
            if idx == 1000:
                after_1k = _rss_mb()
            if idx + 1 == num:
                break
        print(f'{name:<7s} RSS after 1k: {after_1k:7.1f} MB   after {num}: {_rss_mb():7.1f} MB')


@click.command()
@click.option('--num', metavar='INT', type=click.IntRange(min=1001), default=2048, show_default=True, help='Samples.')
@click.option(
    '--train-img-s', metavar='FLOAT', type=FiniteFloatRange(), default=None, help='Training images/s to compare with.'
)
@click.option('--preset', metavar='NAME', default=None, help='Time this training preset here and compare with it.')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True, help='Its batch.')
@click.option('--memory', is_flag=True, help='Measure resident memory instead of speed.')
def main(num: int, train_img_s: float | None, preset: str | None, batch: int, memory: bool) -> None:
    """Decoded samples/s per data-loader worker for tar shards, or resident memory while streaming."""
    with tempfile.TemporaryDirectory() as root:
        if memory:
            _memory(root, num)
            return
        if preset is not None:
            try:
                train_img_s = time_training_steps(preset, batch, steps=5).img_s
            except ThroughputError as e:
                raise click.ClickException(str(e)) from None
            print(f'training {preset}, batch {batch}, on cpu: {train_img_s:.1f} img/s')
        print(f'{"data":<14s} {"samples/s/worker":>16s}' + ('  workers for training' if train_img_s else ''))
        for kind, size in (('png', 64), ('jpeg', 64), ('png', 256), ('jpeg', 256), ('npy', 512)):
            count = num if size == 64 else num // 4
            path = _write(os.path.join(root, f'{kind}{size}'), kind, size, count, 256)
            rate = _rate(path, count)
            label = f'latent {size // 8}²x8' if kind == 'npy' else f'{kind} {size}²'
            need = f'  {train_img_s / rate:>6.1f}' if train_img_s else ''
            print(f'{label:<14s} {rate:>16.0f}{need}')


if __name__ == '__main__':
    main()
