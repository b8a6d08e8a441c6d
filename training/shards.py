"""Streaming training data from WebDataset tar shards, laid out as img2dataset writes them.

A sample is the group of tar members that share a key: `<key>.jpg|jpeg|png|webp` (pixels) or `<key>.npy`
(float32 CHW latents), optional `<key>.txt` (caption), `<key>.json` (metadata) and `<key>.cls` (class
index). `--data` names the shards as a brace pattern (`data/{000000..000099}.tar`), a folder of .tar
files or a text file with one shard path per line.

One pass reads every sample once. The passes of the stream are split over "slots", one per data-loader
worker of every rank (slot = rank * workers + worker): with at least as many shards as slots, slot s
reads shards s, s + N, s + 2N, ... of the pass's shard order (a seeded permutation per pass); with fewer,
the slots that share a shard read all of it and keep every k-th sample (I/O grows by N / shards, decoding
does not). Each slot has its own seeded shuffle buffer and counts what it emits per pass, which is all a
resumed run needs: it replays the same deterministic stream without decoding up to that count.

    >>> ds = ShardDataset('data/{000000..000009}.tar', resolution=64, filters=['original_width>=64'])
    >>> image, label, info = next(iter(ds))   # uint8 [3, 64, 64], one-hot or caption, position record
"""

import dataclasses
import hashlib
import io
import json
import operator
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from torch_utils import distributed as dist
from training.dataset_io import DatasetFileError, decode_image, make_transform
from training.shard_files import IMAGE_FIELDS, ShardError, expand_shards, read_shard

PREVIEW_SIZE = 64  # Samples kept for the first image's shape and the snapshots' sample grids.
_OPS = {'<=': operator.le, '>=': operator.ge, '==': operator.eq, '!=': operator.ne, '<': operator.lt, '>': operator.gt}
_FILTER_RE = re.compile(r'\s*([A-Za-z_][\w.]*)\s*(<=|>=|==|!=|<|>)\s*([^<>=!\s].*?)\s*')
# Fixed columns of the per-sample record; one "dropped by filter i" column follows per filter.
INFO_SLOT, INFO_PASS, INFO_EMITTED, INFO_READ, INFO_CORRUPT, INFO_SMALL = range(6)
NUM_INFO_FIXED = 6
NAMED_CORRUPT = 5  # Corrupt samples each stream (rank and data worker) names in a warning; the rest it counts.


class SampleShapeError(DatasetFileError):
    """A sample shaped unlike the first: the stream skips and counts it as corrupt; among the samples read at
    the start (PREVIEW_SIZE) it stops the start instead, as the data then holds images of mixed sizes."""


# ---- metadata filters ----


@dataclasses.dataclass(frozen=True)
class Filter:
    """`key op value` on a sample's json metadata. Numbers compare as numbers, text as text (== and != only);
    a sample without the key, or with a value of the other kind, fails, as LAION filtering for Stable
    Diffusion training does."""

    text: str
    key: str
    op: str
    value: str
    number: float | None

    def __call__(self, meta: dict) -> bool:
        found = meta.get(self.key)
        if isinstance(found, str):
            return self.op in ('==', '!=') and _OPS[self.op](found, self.value)
        if self.number is None or isinstance(found, bool) or not isinstance(found, (int, float)):
            return False
        return _OPS[self.op](float(found), self.number)


def parse_filter(text: str) -> Filter:
    """'original_width>=512' -> Filter; the value may be quoted."""
    match = _FILTER_RE.fullmatch(text)
    if match is None:
        raise ShardError(
            f'cannot parse filter {text!r}; write KEY OP VALUE with OP one of < <= > >= == !=, e.g. original_width>=512'
        )
    key, op, raw = match.groups()
    value = raw.strip('\'"')
    try:
        number = float(value)
    except ValueError:
        number = None
        if op not in ('==', '!='):
            raise ShardError(f'filter {text!r}: {op} needs a number, got {raw!r}') from None
    return Filter(text=text.strip(), key=key, op=op, value=value, number=number)


# ---- splitting a pass over slots ----


def shard_order(num_shards: int, seed: int, pass_idx: int) -> np.ndarray:
    """The shards of pass `pass_idx` in reading order: a permutation fixed by (seed, pass)."""
    return np.random.default_rng([seed, pass_idx, 0x5A4D]).permutation(num_shards)


def slot_plan(num_shards: int, num_slots: int, slot: int, order: np.ndarray) -> list[tuple[int, int, int]]:
    """(shard index, stride, offset) triples: slot `slot` reads samples offset, offset + stride, ... of each."""
    if num_shards >= num_slots:
        return [(int(order[j]), 1, 0) for j in range(slot, num_shards, num_slots)]
    j = slot % num_shards
    sharing = len(range(j, num_slots, num_shards))
    return [(int(order[j]), sharing, slot // num_shards)]


def _shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A shuffle buffer of `size` items: each new item takes a random place; the evicted one is emitted."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = int(rng.integers(size))
        buffer[k], item = item, buffer[k]
        yield item
    rng.shuffle(buffer)
    yield from buffer


# ---- the dataset ----


class ShardDataset(torch.utils.data.IterableDataset):
    """An endless (or, with `loop=False`, one-pass) stream of (image, label, info) from tar shards.

    `image`: uint8 CHW pixels, resized and centre-cropped to `resolution` by dataset_tool.py convert's
    transform when given (smaller images dropped, or upscaled with `upscale`), or float32 CHW latents.
    `label`: the class one-hot from `cls` (`use_labels`), or the `txt` caption (`use_captions`).
    `info`: int64 record of the slot's position and counters (INFO_* columns) for DataPosition.
    `filters`: strings as parse_filter reads them. `shuffle`: buffer size (0 keeps file order).
    `rank` and `num_replicas` default to torch.distributed's; the worker comes from the DataLoader.
    Corrupt and wrongly sized samples are skipped and counted (training), or with `strict` raise (statistics
    that must cover every image; then an image smaller than `resolution`, not upscaled, raises too).
    """

    def __init__(
        self,
        path: str,
        resolution: int | None = None,
        use_labels: bool = False,
        use_captions: bool = False,
        label_dim: int | None = None,
        xflip: bool = False,
        filters: Sequence[str] = (),
        shuffle: int = 1000,
        upscale: bool = False,
        transform: str = 'center-crop',
        random_seed: int = 0,
        loop: bool = True,
        rank: int | None = None,
        num_replicas: int | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__()
        self._strict = strict
        self._path = str(path)
        self.name = os.path.splitext(os.path.basename(os.path.normpath(self._path.split('{')[0]) or 'shards'))[0]
        self.shards = expand_shards(self._path)
        self.filters = [parse_filter(f) for f in filters]
        self._resolution = resolution
        self._transform = make_transform(transform, resolution, resolution) if resolution is not None else None
        self._use_labels, self._use_captions, self._xflip = use_labels, use_captions, xflip
        self._upscale, self._shuffle, self._seed, self._loop = upscale, int(shuffle), int(random_seed), loop
        # Resolved here, in the main process; the data-loader workers get copies.
        self._rank = dist.get_rank() if rank is None else rank
        self._num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
        self._position: dict[int, tuple[int, int]] = {}
        self._image_shape: list[int] | None = None
        self._label_dim = 0
        self.preview: list[tuple[np.ndarray, Any]] = []
        self.preview_captions: list[str] = []
        for sample in self._first_samples(PREVIEW_SIZE):
            try:
                image = self._decode(sample)
            except SampleShapeError as e:
                raise ShardError(str(e)) from None
            except DatasetFileError:
                continue  # Counted as corrupt when the stream reaches it.
            if image is not None:
                self.preview.append((image, sample))
        if not self.preview:
            raise ShardError(f'{self.shards[0]}: holds no readable sample that passes the filters')
        if use_labels:
            self._label_dim = label_dim if label_dim is not None else self._scan_label_dim()
        self.preview_captions = [self._caption(s) for _, s in self.preview]
        self.has_captions = any(self.preview_captions)
        if use_captions and not self.has_captions:
            raise ShardError(f'{self.shards[0]}: its samples have no txt captions; train without captions')
        self.preview = [(image, self._label(s)) for image, s in self.preview]

    # ---- reading ----

    def _first_samples(self, num: int) -> Iterator[dict]:
        count = 0
        for path in self.shards:
            for sample in read_shard(path):
                if all(f(self._meta(sample)) for f in self.filters):
                    yield sample
                    count += 1
                    if count == num:
                        return

    def _scan_label_dim(self) -> int:
        """One more than the largest `cls` of all shards (pass label_dim= to skip this full read). Every sample
        that passes the filters must have a valid `cls`, as every image of a labelled folder needs a label."""
        labels, unlabelled = [], None
        for path in self.shards:
            for sample in read_shard(path):
                if 'cls' in sample:
                    labels.append(self._class_index(sample))
                elif unlabelled is None and all(f(self._meta(sample)) for f in self.filters):
                    unlabelled = sample
        if not labels:
            raise ShardError(f'{self._path}: no sample has a cls label; train without labels (--cond=False)')
        if unlabelled is not None:
            self._class_index(unlabelled)  # Raises the error naming it.
        return max(labels) + 1

    @staticmethod
    def _where(sample: dict) -> str:
        return f'{sample.get("__url__", "shard")}:{sample["__key__"]}'

    @classmethod
    def _class_index(cls, sample: dict) -> int:
        """The sample's `cls` member as a class index; a missing or malformed one raises ShardError naming it."""
        if 'cls' not in sample:
            raise ShardError(
                f'{cls._where(sample)}: no cls member (class label); add one to every sample, '
                f'or train without labels (--cond=False)'
            )
        text = sample['cls'].decode('utf-8', 'replace').strip()
        if not re.fullmatch(r'\d+', text, re.ASCII):
            raise ShardError(f'{cls._where(sample)}.cls: {text!r} is not a class index 0, 1, 2, ...; fix the shard')
        return int(text)

    @staticmethod
    def _meta(sample: dict) -> dict:
        try:
            meta = json.loads(sample['json']) if 'json' in sample else {}
        except ValueError:
            return {}
        return meta if isinstance(meta, dict) else {}

    @staticmethod
    def _caption(sample: dict) -> str:
        return sample['txt'].decode('utf-8', 'replace').strip() if 'txt' in sample else ''

    def _label(self, sample: dict) -> np.ndarray | str:
        if self._use_captions:
            return self._caption(sample)
        onehot = np.zeros([self._label_dim], dtype=np.float32)
        if self._use_labels:
            label = self._class_index(sample)
            if not label < self._label_dim:
                raise ShardError(f'{self._where(sample)}.cls: {label} is outside 0..{self._label_dim - 1}')
            onehot[label] = 1
        return onehot

    def _decode(self, sample: dict) -> np.ndarray | None:
        """The sample's image as CHW; None when it is smaller than the resolution (and not upscaled).
        A corrupt member raises DatasetFileError; a shape differing from the first sample's SampleShapeError."""
        where = self._where(sample)
        if 'npy' in sample:
            try:
                array = np.load(io.BytesIO(sample['npy']), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise DatasetFileError(f'{where}.npy: unreadable ({e})') from None
            image = np.asarray(array, dtype=np.float32)
        else:
            field = next((f for f in IMAGE_FIELDS if f in sample), None)
            if field is None:
                raise DatasetFileError(f'{where}: no image ({", ".join(IMAGE_FIELDS)}) or npy member')
            pixels = decode_image(sample[field], f'{where}.{field}')
            if self._transform is not None:
                if min(pixels.shape[:2]) < self._resolution and not self._upscale:
                    if self._strict:
                        height, width = pixels.shape[:2]
                        raise ShardError(
                            f'{where}: {width}x{height} is smaller than the resolution {self._resolution}; '
                            f'give --upscale to upscale such images'
                        )
                    return None
                pixels = self._transform(pixels)
            image = pixels.transpose(2, 0, 1)
        if self._image_shape is None:
            self._image_shape = list(image.shape)
        elif list(image.shape) != self._image_shape:
            fix = (
                'latents cannot be resized: encode the images at one size'
                if 'npy' in sample
                else 'pixel shards of mixed sizes are resized as they stream with --resolution'
            )
            raise SampleShapeError(
                f"{where}: shape {list(image.shape)} differs from the first sample's {self._image_shape}; {fix}"
            )
        return image

    # ---- iteration ----

    def set_position(self, position: dict[int, tuple[int, int]]) -> None:
        """Where each slot resumes: {slot: (pass, samples emitted in that pass)}; set before iterating."""
        self._position = dict(position)

    def _slot(self) -> tuple[int, int]:
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        return self._rank * workers + worker_id, self._num_replicas * workers

    def __iter__(self) -> Iterator[tuple[np.ndarray, Any, np.ndarray]]:
        slot, num_slots = self._slot()
        return self.iter_slot(slot, num_slots)

    def iter_slot(self, slot: int, num_slots: int) -> Iterator[tuple[np.ndarray, Any, np.ndarray]]:
        """The stream of slot `slot` of `num_slots`, resuming from set_position()."""
        start_pass, skip = self._position.get(slot, (0, 0))
        counts = np.zeros(NUM_INFO_FIXED + len(self.filters), dtype=np.int64)
        counts[INFO_SLOT] = slot
        pass_idx = start_pass
        while True:
            counts[INFO_PASS] = pass_idx
            emitted = yield from self._one_pass(
                slot, num_slots, pass_idx, skip if pass_idx == start_pass else 0, counts
            )
            if emitted == 0:
                raise ShardError(
                    f'{self._path}: data worker {slot} of {num_slots} got no sample in a pass (too few samples pass '
                    f'the filters in its shards); use fewer --workers or ranks, or more shards'
                )
            if not self._loop:
                return
            pass_idx += 1

    def _one_pass(self, slot: int, num_slots: int, pass_idx: int, skip: int, counts: np.ndarray):
        rng = np.random.default_rng([self._seed, pass_idx, slot, num_slots])
        plan = slot_plan(len(self.shards), num_slots, slot, shard_order(len(self.shards), self._seed, pass_idx))
        counting = [skip == 0]  # Samples replayed on resume were counted by the run that read them.

        def kept() -> Iterator[dict]:
            for shard, stride, offset in plan:
                for i, sample in enumerate(read_shard(self.shards[shard])):
                    if i % stride != offset:
                        continue
                    counts[INFO_READ] += counting[0]
                    meta = self._meta(sample)
                    failed = next((k for k, f in enumerate(self.filters) if not f(meta)), None)
                    if failed is None:
                        yield sample
                    else:
                        counts[NUM_INFO_FIXED + failed] += counting[0]

        stream = _shuffled(kept(), self._shuffle, rng) if self._shuffle > 0 else kept()
        emitted = 0
        for sample in stream:
            emitted += 1
            flip = self._xflip and rng.random() < 0.5
            if emitted <= skip:
                counting[0] = emitted == skip
                continue
            try:
                image = self._decode(sample)
            except DatasetFileError as e:  # Also a wrongly sized sample (SampleShapeError).
                if self._strict:
                    raise ShardError(str(e)) from None
                counts[INFO_CORRUPT] += 1
                if counts[INFO_CORRUPT] <= NAMED_CORRUPT:
                    more = (
                        '; further ones of this stream are only counted'
                        if counts[INFO_CORRUPT] == NAMED_CORRUPT
                        else ''
                    )
                    print(f'Warning: {e}; skipped, counted as Data/corrupt{more}.', flush=True)
                continue
            if image is None:
                counts[INFO_SMALL] += 1
                continue
            counts[INFO_EMITTED] = emitted
            yield (image[:, :, ::-1] if flip else image).copy(), self._label(sample), counts.copy()
        return emitted

    # ---- what the training loop and scripts read ----

    @property
    def image_shape(self) -> list[int]:
        return list(self._image_shape)

    @property
    def num_channels(self) -> int:
        return self._image_shape[0]

    @property
    def resolution(self) -> int:
        _c, height, width = self._image_shape
        if height != width:
            raise ShardError(
                f'{self._path}: images are {width}x{height}, not square; train_edm2.py --resolution resizes them'
            )
        return height

    @property
    def label_dim(self) -> int:
        return self._label_dim

    @property
    def label_shape(self) -> list[int]:
        return [self._label_dim]

    @property
    def has_labels(self) -> bool:
        return self._label_dim > 0

    def fingerprint(self) -> str:
        """Identifies the shard list and filters, so that a resume can tell whether --data changed."""
        text = '\n'.join([*self.shards, *(f.text for f in self.filters), str(self._seed)])
        return hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.preview)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, Any]:
        """The preview samples (the first PREVIEW_SIZE that pass the filters), for shapes and sample grids."""
        image, label = self.preview[idx % len(self.preview)]
        return image, label

    def get_caption(self, idx: int) -> str:
        return self.preview_captions[idx % len(self.preview)]

    def filter_names(self) -> list[str]:
        return [f.text for f in self.filters]
