"""Training data: a folder or an uncompressed ZIP of image or NPY files, as EDM2 lays datasets out.

Image files (PNG as dataset_tool.py writes them, or any type its convert reads: JPEG, WebP, ...) hold pixels
(uint8, HWC on disk, returned CHW); NPY files hold float32 CHW arrays (e.g. VAE latents). An optional
`dataset.json` at the root maps relative paths to class labels and captions:
`{"labels": [["00000/img00000000.png", 3], ...], "captions": [["00000/img00000000.png", "a cat"], ...]}`.

Example:
    >>> dataset = ImageFolderDataset('datasets/shapes-32.zip', use_labels=True, xflip=True)
    >>> image, label = dataset[0]   # uint8 [3, 32, 32], float32 one-hot [5]
    >>> dataset.get_caption(0)
    'a red circle on a blue background, at the top left'
"""

import io
import json
import os
import zipfile
import zlib
from typing import IO

import numpy as np
import torch
from PIL import Image

import dnnlib
from training.dataset_io import GRAY_MODES, SOURCE_EXTENSIONS, eight_bit, unreadable_image

IMAGE_EXTENSIONS = (*SOURCE_EXTENSIONS, '.npy')
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, zipfile.BadZipFile, KeyError)


class DatasetError(Exception):
    """A problem with a dataset that the user can fix; the message names the file and what to do."""


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images (and optional labels and captions) from a folder or an uncompressed ZIP.

    Construction is cheap: it lists the files, reads the first image for the shape and reads
    dataset.json. Every later read checks the image's shape; `validate()` reads all of them.
    `max_size` keeps a random subset (fixed by `random_seed`); `xflip` appends mirrored copies.
    `use_captions` makes each item's label its caption (a string; '' where none) for text-conditioned nets.
    """

    def __init__(
        self,
        path: str,
        resolution: int | None = None,
        max_size: int | None = None,
        use_labels: bool = False,
        xflip: bool = False,
        random_seed: int = 0,
        cache: bool = False,
        use_captions: bool = False,
    ) -> None:
        self._path = str(path)
        self._cache = cache
        self._cached_images: dict[int, np.ndarray] = {}
        self._zipfile: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        self.name = os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]

        if os.path.isdir(self._path):
            self._type = 'dir'
            all_fnames = {
                os.path.relpath(os.path.join(root, fname), self._path).replace(os.sep, '/')
                for root, _dirs, files in os.walk(self._path, followlinks=True)
                for fname in files
            }
        elif os.path.isfile(self._path):
            self._type = 'zip'
            all_fnames = {name for name in self._get_zipfile().namelist() if not name.endswith('/')}
        else:
            raise DatasetError(f'{self._path}: no such folder or ZIP file; make a dataset with dataset_tool.py')
        self._image_fnames = sorted(f for f in all_fnames if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self._image_fnames:
            raise DatasetError(
                f'{self._path}: contains no image or NPY files ({", ".join(IMAGE_EXTENSIONS)}); '
                f'make a dataset with dataset_tool.py'
            )
        if len({f.lower().endswith('.npy') for f in self._image_fnames}) > 1:
            raise DatasetError(f'{self._path}: mixes images and NPY files; a dataset holds one kind')

        self._raw_shape = [len(self._image_fnames), *self._load_raw_image(0).shape]
        if resolution is not None and self._raw_shape[2:] != [resolution, resolution]:
            raise DatasetError(
                f'{self._describe(0)}: image is {self._shape_str(self._raw_shape[1:])} but resolution '
                f'{resolution} was requested; convert the data with dataset_tool.py convert --resolution'
            )

        metadata = self._load_metadata() if 'dataset.json' in all_fnames else {}
        self._raw_labels = self._parse_labels(metadata) if use_labels else None
        self._label_dim = int(self._raw_labels.max()) + 1 if self._raw_labels is not None else 0
        self._captions = self._parse_captions(metadata)
        self._use_captions = use_captions
        if use_captions and not self._captions:
            raise DatasetError(
                f'{self._path}: has no captions (dataset.json "captions"); add them with dataset_tool.py convert'
            )

        num_raw = len(self._image_fnames)
        self._raw_idx = np.arange(num_raw, dtype=np.int64)
        if max_size is not None:
            if max_size < 1:
                raise DatasetError(f'max_size must be a positive number of images, got {max_size}')
            if max_size < num_raw:
                rng = np.random.default_rng(random_seed)
                self._raw_idx = np.sort(rng.choice(num_raw, size=max_size, replace=False))
        self._xflip = np.zeros(len(self._raw_idx), dtype=bool)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    # ---- files ----

    def _describe(self, raw_idx: int) -> str:
        return self._describe_fname(self._image_fnames[raw_idx])

    def _describe_fname(self, fname: str) -> str:
        return os.path.join(self._path, fname) if self._type == 'dir' else f'{self._path}:{fname}'

    def _get_zipfile(self) -> zipfile.ZipFile:
        if self._zipfile is None or self._zip_pid != os.getpid():  # each worker process opens its own
            try:
                self._zipfile = zipfile.ZipFile(self._path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DatasetError(
                    f'{self._path}: not a folder or a valid ZIP file ({e}); re-create it with dataset_tool.py'
                ) from None
            self._zip_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname: str) -> IO[bytes]:
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def _read_bytes(self, fname: str) -> bytes:
        try:
            with self._open_file(fname) as f:
                return f.read()
        except _DECODE_ERRORS as e:
            raise DatasetError(f'{self._describe_fname(fname)}: cannot be read ({e}); replace or remove it') from None

    @staticmethod
    def _shape_str(shape: list[int]) -> str:
        return f'{shape[2]}x{shape[1]} with {shape[0]} channels'

    def _load_raw_image(self, raw_idx: int) -> np.ndarray:
        fname = self._image_fnames[raw_idx]
        data = self._read_bytes(fname)
        try:
            if fname.lower().endswith('.npy'):
                image = np.load(io.BytesIO(data), allow_pickle=False)
                if image.ndim != 3 or not np.issubdtype(image.dtype, np.floating):
                    raise ValueError(f'expected a float CHW array, found {image.dtype} of shape {list(image.shape)}')
                return image.astype(np.float32, copy=False)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                pixels = eight_bit(img)
                image = np.array(pixels if pixels.mode in ('L', 'RGB', 'RGBA') else pixels.convert('RGB'))
        except _DECODE_ERRORS as e:
            raise DatasetError(unreadable_image(self._describe(raw_idx), e)) from None
        if image.ndim == 2:
            image = image[:, :, np.newaxis]
        return image.transpose(2, 0, 1)

    def _get_raw_image(self, raw_idx: int) -> np.ndarray:
        image = self._cached_images.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if list(image.shape) != self.image_shape:
                raise DatasetError(
                    f'{self._describe(raw_idx)}: image is {self._shape_str(list(image.shape))}, but '
                    f'{self._describe(0)} is {self._shape_str(self.image_shape)}; give all images one '
                    f'size, e.g. with dataset_tool.py convert --resolution'
                )
            if self._cache:
                self._cached_images[raw_idx] = image
        return image

    def validate(self, decode: bool = True, allow: int = 0) -> list[str]:
        """Read every image in use and check that it decodes and has the dataset's shape; with `decode=False`
        only each file's header is read (fast enough for every start of a run). Up to `allow` bad files are
        returned as one-line problems (training skips them); with more, the first raises a DatasetError."""
        problems = []
        for raw_idx in np.unique(self._raw_idx):
            try:
                if decode:
                    self._get_raw_image(int(raw_idx))
                elif (shape := self._header_shape(int(raw_idx))) != self.image_shape:
                    raise DatasetError(
                        f'{self._describe(int(raw_idx))}: image is {self._shape_str(shape)}, but '
                        f'{self._describe(0)} is {self._shape_str(self.image_shape)}; give all images one size, '
                        f'e.g. with dataset_tool.py convert --resolution'
                    )
            except DatasetError as e:
                problems.append(str(e))
        if len(problems) > allow:
            raise DatasetError(problems[0])
        return problems

    def _header_shape(self, raw_idx: int) -> list[int]:
        """The CHW shape an image will load as, from its file header alone."""
        fname = self._image_fnames[raw_idx]
        try:
            with self._open_file(fname) as f:
                if fname.lower().endswith('.npy'):
                    fmt = np.lib.format
                    read_header = (
                        fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
                    )
                    return list(read_header(f)[0])
                with Image.open(f) as img:
                    channels = 1 if img.mode in GRAY_MODES else 4 if img.mode == 'RGBA' else 3
                    return [channels, img.height, img.width]
        except _DECODE_ERRORS as e:
            raise DatasetError(unreadable_image(self._describe(raw_idx), e)) from None

    def close(self) -> None:
        if self._zipfile is not None and self._zip_pid == os.getpid():
            self._zipfile.close()
        self._zipfile = None
        self._zip_pid = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _zipfile=None, _zip_pid=None)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # the interpreter may be shutting down
            pass

    # ---- dataset.json ----

    def _load_metadata(self) -> dict:
        where = self._describe_fname('dataset.json')
        try:
            metadata = json.loads(self._read_bytes('dataset.json').decode('utf-8'))
        except (ValueError, UnicodeDecodeError) as e:
            raise DatasetError(f'{where}: not valid JSON ({e}); fix or delete it') from None
        if not isinstance(metadata, dict):
            raise DatasetError(f'{where}: expected a JSON object with "labels" and/or "captions"')
        return metadata

    def _parse_mapping(self, metadata: dict, key: str) -> dict[str, object]:
        entries = metadata.get(key)
        if entries is None:
            return {}
        try:
            mapping = dict(entries)
        except (TypeError, ValueError):
            raise DatasetError(
                f'{self._describe_fname("dataset.json")}: "{key}" must be a list of [relative/path, value] pairs'
            ) from None
        return {str(fname).replace('\\', '/'): value for fname, value in mapping.items()}

    def _parse_labels(self, metadata: dict) -> np.ndarray | None:
        labels = self._parse_mapping(metadata, 'labels')
        if not labels:
            return None
        where = self._describe_fname('dataset.json')
        raw_labels = []
        for fname in self._image_fnames:
            if fname not in labels:
                raise DatasetError(
                    f'{where}: no label for {fname}; add ["{fname}", <class index>] to "labels" or train without labels'
                )
            label = labels[fname]
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise DatasetError(f'{where}: label of {fname} is {label!r}; labels must be class indices 0, 1, 2, ...')
            raw_labels.append(label)
        return np.array(raw_labels, dtype=np.int64)

    def _parse_captions(self, metadata: dict) -> dict[str, str]:
        captions = self._parse_mapping(metadata, 'captions')
        for fname, caption in captions.items():
            if not isinstance(caption, str):
                raise DatasetError(
                    f'{self._describe_fname("dataset.json")}: caption of {fname} is {caption!r}; '
                    f'captions must be strings'
                )
        return {fname: captions[fname] for fname in self._image_fnames if fname in captions}

    # ---- items ----

    def __len__(self) -> int:
        return len(self._raw_idx)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray | str]:
        image = self._get_raw_image(int(self._raw_idx[idx]))
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_caption(idx) if self._use_captions else self.get_label(idx)

    def get_label(self, idx: int) -> np.ndarray:
        onehot = np.zeros(self.label_shape, dtype=np.float32)
        if self._raw_labels is not None:
            onehot[self._raw_labels[self._raw_idx[idx]]] = 1
        return onehot

    def caption_texts(self) -> list[str]:
        """Every caption of the dataset's files (those without one are absent)."""
        return list(self._captions.values())

    def get_caption(self, idx: int) -> str:
        return self._captions.get(self._image_fnames[self._raw_idx[idx]], '')

    def get_details(self, idx: int) -> dnnlib.EasyDict:
        raw_idx = int(self._raw_idx[idx])
        return dnnlib.EasyDict(
            raw_idx=raw_idx,
            fname=self._image_fnames[raw_idx],
            xflip=bool(self._xflip[idx]),
            raw_label=None if self._raw_labels is None else int(self._raw_labels[raw_idx]),
            caption=self.get_caption(idx),
        )

    # ---- properties ----

    @property
    def image_shape(self) -> list[int]:
        return list(self._raw_shape[1:])

    @property
    def num_channels(self) -> int:
        return self.image_shape[0]

    @property
    def resolution(self) -> int:
        _channels, height, width = self.image_shape
        if height != width:
            raise DatasetError(
                f'{self._path}: images are {width}x{height}, not square; the networks need square '
                f'images, e.g. from dataset_tool.py convert --resolution={max(height, width)}'
            )
        return height

    @property
    def label_shape(self) -> list[int]:
        return [self._label_dim]

    @property
    def label_dim(self) -> int:
        return self._label_dim

    @property
    def has_labels(self) -> bool:
        return self._label_dim > 0

    @property
    def has_captions(self) -> bool:
        return bool(self._captions)
