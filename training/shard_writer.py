"""Writing tar shards in img2dataset's layout, and encoding pixel shards into latent shards.

Every shard appears only once complete (written beside its name, then renamed), so a folder of shards
is always a set of finished shards: an interrupted `encode` resumes by skipping the shards that exist.
`shards` writes its whole folder beside `dest` and renames it at the end, so a failed run leaves nothing.
A sample is `<key>.<ext>` (the source file's bytes, or `npy`), `<key>.txt` (caption, when there is one),
`<key>.json` (metadata: key, original_width, original_height, label and source path where known) and
`<key>.cls` (class index, when labelled).
"""

import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

import dnnlib
from training.dataset_io import DatasetFileError, ImageSource, decode_image, new_folder, unreadable_image
from training.shard_files import IMAGE_FIELDS, expand_shards, is_shard_spec, read_shard


def shard_name(idx: int) -> str:
    return f'{idx:06d}.tar'


def write_shard(path: str, samples: Iterable[dict[str, Any]]) -> int:
    """Write one tar shard atomically; returns how many samples it holds."""
    count = 0
    with dnnlib.util.atomic_write(path, 'wb') as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0)
        for sample in samples:
            writer.write(sample)
            count += 1
        writer.close()
    return count


def _image_size(data: bytes, where: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (OSError, ValueError) as e:
        raise DatasetFileError(unreadable_image(where, e)) from None


def _source_samples(source: str, max_images: int | None) -> Iterator[dict[str, Any]]:
    """Samples of a folder or ZIP of images (labels and captions as dataset_tool.py convert finds them)."""
    images = ImageSource(source, max_images=max_images)
    for idx, relpath in enumerate(images.relpaths):
        data = images.read(relpath)
        width, height = _image_size(data, images.describe(relpath))
        ext = os.path.splitext(relpath)[1].lower().lstrip('.')
        meta: dict[str, Any] = dict(key=f'{idx:09d}', original_width=width, original_height=height, source=relpath)
        sample = {'__key__': f'{idx:09d}', 'jpg' if ext == 'jpeg' else ext: data}
        if images.labels is not None:
            meta['label'] = images.labels[relpath]
            sample['cls'] = str(images.labels[relpath]).encode()
        caption = images.caption(relpath)
        if caption:
            sample['txt'] = caption.encode('utf-8')
        sample['json'] = json.dumps(meta).encode('utf-8')
        yield sample


def _shard_samples(spec: str, max_images: int | None) -> Iterator[dict[str, Any]]:
    """Samples of existing shards, with original_width/original_height added to their json where missing."""
    count = 0
    for path in expand_shards(spec):
        for sample in read_shard(path):
            if max_images is not None and count >= max_images:
                return
            field = next((f for f in IMAGE_FIELDS if f in sample), None)
            try:
                meta = json.loads(sample['json']) if 'json' in sample else {}
                if not isinstance(meta, dict):
                    raise ValueError(f'a JSON {type(meta).__name__}, not an object')
            except ValueError as e:  # UnicodeDecodeError and JSONDecodeError too
                raise DatasetFileError(
                    f'{path}:{sample["__key__"]}.json: malformed ({e}); fix it or remove the sample'
                ) from None
            if field is not None and 'original_width' not in meta:
                where = f'{path}:{sample["__key__"]}.{field}'
                meta['original_width'], meta['original_height'] = _image_size(sample[field], where)
            sample['json'] = json.dumps(meta).encode('utf-8')
            yield {k: v for k, v in sample.items() if k != '__url__'}
            count += 1


def make_shards(
    source: str, dest: str, per_shard: int, max_images: int | None = None, progress: Callable[[int], Any] | None = None
) -> int:
    """Folder, ZIP or shards -> `dest`/000000.tar, 000001.tar, ... of `per_shard` samples; returns the count.
    The shards are written into a folder beside `dest` that becomes `dest` once all are: an error leaves none."""
    samples = _shard_samples(source, max_images) if is_shard_spec(source) else _source_samples(source, max_images)
    total, idx = 0, 0
    with new_folder(dest) as folder:
        while chunk := [s for _, s in zip(range(per_shard), samples)]:
            total += write_shard(os.path.join(folder, shard_name(idx)), chunk)
            idx += 1
            if progress is not None:
                progress(len(chunk))
    return total


def _latent_samples(path: str, encode: Callable[[np.ndarray], np.ndarray], batch: int) -> Iterator[dict[str, Any]]:
    """The samples of pixel shard `path` with the image replaced by `<key>.npy` latents, `batch` at a time."""
    pending: list[tuple[dict, np.ndarray]] = []

    def flush() -> Iterator[dict[str, Any]]:
        latents = encode(np.stack([pixels for _, pixels in pending]))
        for (sample, _), latent in zip(pending, latents):
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(latent, dtype=np.float32), allow_pickle=False)
            yield dict(sample, npy=buffer.getvalue())
        pending.clear()

    for sample in read_shard(path):
        field = next((f for f in IMAGE_FIELDS if f in sample), None)
        if field is None:
            continue
        try:
            pixels = decode_image(sample[field], f'{path}:{sample["__key__"]}.{field}').transpose(2, 0, 1)
        except DatasetFileError:
            continue  # A corrupt member has no latents; the training reader would skip it too.
        if pending and pixels.shape != pending[0][1].shape:
            raise DatasetFileError(
                f'{path}:{sample["__key__"]}: image is {pixels.shape[2]}x{pixels.shape[1]}, the first '
                f'{pending[0][1].shape[2]}x{pending[0][1].shape[1]}; encode needs one size: make the images one '
                f'size with dataset_tool.py convert --resolution, then shards'
            )
        kept = {k: v for k, v in sample.items() if k not in (*IMAGE_FIELDS, '__url__')}
        pending.append((kept, pixels))
        if len(pending) == batch:
            yield from flush()
    if pending:
        yield from flush()


def encode_shards(
    source: str, dest: str, encode: Callable[[np.ndarray], np.ndarray], batch: int, rank: int = 0, world: int = 1
) -> list[str]:
    """Pixel shards -> latent shards of the same names in `dest` (shard i on rank i % world). A shard that
    exists in `dest` is finished (written atomically) and skipped, so re-running resumes. Returns the
    shards this rank wrote."""
    os.makedirs(dest, exist_ok=True)
    written = []
    for i, path in enumerate(expand_shards(source)):
        out = os.path.join(dest, os.path.basename(path))
        if i % world != rank or os.path.isfile(out):
            continue
        write_shard(out, _latent_samples(path, encode, batch))
        written.append(out)
    return written
