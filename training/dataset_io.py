"""Dataset files: the writer (folder or uncompressed ZIP plus dataset.json), the image source reader and
the crops of dataset_tool.py (ADM's ImageNet preprocessing, Dhariwal & Nichol 2021), reusable by other tools.
A problem the user can fix raises DatasetFileError with a one-line message naming the file."""

import contextlib
import csv
import io
import json
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

import dnnlib
from training import prompt_sets, shapes
from training.output_paths import file_on_the_way

SOURCE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif', '.tiff')
TRANSFORMS = ('center-crop', 'center-crop-wide', 'center-crop-dhariwal')
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    zipfile.BadZipFile,
    KeyError,
    Image.DecompressionBombError,
)


class DatasetFileError(Exception):
    """A source or destination the user can fix; the one-line message names the file and what to do."""


# ---- writing ----


def item_relpath(idx: int, ext: str = 'png') -> str:
    """Path of item `idx` inside a dataset: 1000 files per sub-folder."""
    return f'{idx // 1000:05d}/img{idx:08d}.{ext}'


def check_new_folder(dest: str) -> None:
    """DatasetFileError unless `dest` is new or an empty folder, and can be made."""
    if os.path.exists(dest) and not (os.path.isdir(dest) and not os.listdir(dest)):
        raise DatasetFileError(f'{dest}: already exists and is not an empty folder; choose a new --dest')
    _check_parent(dest)


def check_new_dest(dest: str) -> None:
    """DatasetFileError unless `dest` can become a dataset: a new ZIP (by its extension), else a new or empty
    folder, with no file on its way."""
    if not dest.lower().endswith('.zip'):
        check_new_folder(dest)
        return
    if os.path.exists(dest):
        raise DatasetFileError(f'{dest}: already exists; choose a new --dest (or delete it first)')
    _check_parent(dest)


def _check_parent(dest: str) -> None:
    if blocker := file_on_the_way(dest):
        raise DatasetFileError(f'{dest}: {blocker} is a file, not a folder; choose another --dest')


@contextlib.contextmanager
def new_folder(dest: str) -> Iterator[str]:
    """A temporary folder beside `dest` to fill; it becomes `dest` when the block ends without an error and is
    removed when it raises, so that `dest` only ever appears complete. `dest` must be new or an empty folder."""
    check_new_folder(dest)
    parent, name = os.path.split(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, f'.{name}.{uuid.uuid4().hex}.tmp')
    os.mkdir(tmp_dir)
    try:
        yield tmp_dir
        if os.path.isdir(dest):
            os.rmdir(dest)  # empty, checked on entry
        os.replace(tmp_dir, dest)
    finally:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 HWC (or HW) image -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='png')
    return buffer.getvalue()


class DatasetWriter:
    """Writes a dataset to a folder or, when `dest` ends in .zip, to an uncompressed ZIP.

    Either appears at `dest` only once complete: it is written to a temporary file or folder beside
    `dest` and renamed on success, and removed on error. A ZIP `dest` must be new, a folder new or empty. On
    leaving the `with` block without an error, dataset.json is written from the labels and captions.

        with DatasetWriter('out.zip') as writer:
            writer.add_image(item_relpath(0), image, label=3, caption='a cat')
    """

    def __init__(self, dest: str) -> None:
        self.dest = str(dest)
        self.is_zip = self.dest.lower().endswith('.zip')
        self._labels: list[tuple[str, int | None]] = []
        self._captions: list[tuple[str, str]] = []
        self._stack = contextlib.ExitStack()
        self._zip: zipfile.ZipFile | None = None
        self._tmp_dir: str | None = None

    def __enter__(self) -> 'DatasetWriter':
        if self.is_zip:
            check_new_dest(self.dest)
            os.makedirs(os.path.dirname(os.path.abspath(self.dest)), exist_ok=True)
            file = self._stack.enter_context(dnnlib.util.atomic_write(self.dest, 'wb'))
            self._zip = zipfile.ZipFile(file, mode='w', compression=zipfile.ZIP_STORED)
        else:
            self._tmp_dir = self._stack.enter_context(new_folder(self.dest))
        return self

    def add_file(self, relpath: str, data: bytes) -> None:
        if self._zip is not None:
            # A fixed timestamp makes the ZIP a function of its content alone (reproducible, resumable).
            info = zipfile.ZipInfo(relpath, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            self._zip.writestr(info, data, compress_type=zipfile.ZIP_STORED)
            return
        path = os.path.join(self._tmp_dir, relpath)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with dnnlib.util.atomic_write(path, 'wb') as f:
            f.write(data)

    def _record(self, relpath: str, label: int | None, caption: str) -> None:
        self._labels.append((relpath, label))
        if caption:
            self._captions.append((relpath, caption))

    def add_image(self, relpath: str, image: np.ndarray, label: int | None = None, caption: str = '') -> None:
        """Add a uint8 HWC image as PNG."""
        self.add_file(relpath, encode_png(image))
        self._record(relpath, label, caption)

    def add_array(self, relpath: str, array: np.ndarray, label: int | None = None, caption: str = '') -> None:
        """Add a float32 CHW array (e.g. latents) as NPY."""
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(array, dtype=np.float32), allow_pickle=False)
        self.add_file(relpath, buffer.getvalue())
        self._record(relpath, label, caption)

    def metadata(self) -> dict:
        has_labels = any(label is not None for _, label in self._labels)
        return {
            'labels': [[relpath, label] for relpath, label in self._labels] if has_labels else None,
            'captions': [[relpath, caption] for relpath, caption in self._captions] or None,
        }

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        try:
            if exc_type is None:
                self.add_file('dataset.json', json.dumps(self.metadata(), ensure_ascii=False).encode('utf-8'))
            if self._zip is not None:
                self._zip.close()
        except BaseException as e:
            exc_type, exc, tb = type(e), e, e.__traceback__
            raise
        finally:
            self._stack.__exit__(exc_type, exc, tb)  # Completes or removes the ZIP or folder.
        return False


def write_synthetic_dataset(
    dest: str,
    resolution: int = 32,
    num_images: int = 10000,
    seed: int = 0,
    progress: bool = True,
    hold_out: Sequence[str] = (),
) -> None:
    """Write the coloured-shapes demo dataset (training/shapes.py) with labels and captions.

    `hold_out`: caption fragments, e.g. 'red circle' or 'on a blue background, at the top'; scenes whose
    caption contains any of them are skipped, so those combinations are absent from the data (a test of
    compositional generalisation; prompt_sets.dataset_scenes). Without it, item i is scene i of `seed`."""
    if hold_out and all(prompt_sets.held_out(scene.caption, hold_out) for scene in prompt_sets.all_scenes()):
        raise DatasetFileError(f'Holding out {", ".join(map(repr, hold_out))} leaves no caption to write.')
    with DatasetWriter(dest) as writer:
        scenes = prompt_sets.dataset_scenes(seed, num_images, hold_out)
        bar = dnnlib.util.progress_bar(scenes, total=num_images, desc='synth', unit='img', disable=not progress)
        for idx, scene in enumerate(bar):
            image = shapes.render_scene(scene, resolution)
            writer.add_image(item_relpath(idx), image, label=scene.label, caption=scene.caption)


# ---- reading ----


class SourceImage(NamedTuple):
    relpath: str
    image: np.ndarray  # uint8 HWC RGB
    label: int | None
    caption: str


GRAY_MODES = ('L', 'I', 'I;16', 'I;16L', 'I;16B', 'I;16N')  # Pillow's one-channel modes eight_bit() makes 'L'


def eight_bit(img: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (PNG, TIFF) as 8-bit 'L' by its high byte, value >> 8, as Pillow itself reads
    16-bit colour PNGs (Pillow's convert() would clip those values to 255 instead of scaling). Pillow's 32-bit
    'I' mode counts as 16 bits when its values fit; float pixels have no range to scale from and raise
    ValueError. Other images are returned as they are."""
    if img.mode == 'F':
        raise ValueError('floating-point pixels; save the image with 8 or 16 bits per channel')
    if img.mode not in GRAY_MODES[1:]:
        return img
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 0xFFFF):
        raise ValueError('integer pixels outside 0..65535; save the image with 8 or 16 bits per channel')
    return Image.fromarray((values >> 8).astype(np.uint8), mode='L')


def unreadable_image(where: str, error: Exception) -> str:
    """The message for an image that cannot be decoded, without the object reprs PIL puts in its errors."""
    reason = re.sub(r' ?<[^<>]* at 0x[0-9a-fA-F]+>', '', str(error)).strip() or type(error).__name__
    return f'{where}: unreadable image ({reason}); replace or remove it'


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Image file bytes -> uint8 HWC RGB (16-bit images by eight_bit); a corrupt file raises DatasetFileError
    naming `name`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.array(eight_bit(img).convert('RGB'))
    except _DECODE_ERRORS as e:
        raise DatasetFileError(unreadable_image(name, e)) from None


def load_caption_mapping(path: str) -> dict[str, str]:
    """Captions by image path from a JSON object {path: caption} or a CSV of rows path,caption (header optional)."""
    try:
        with open(path, encoding='utf-8', newline='') as f:
            if path.lower().endswith('.json'):
                mapping = json.load(f)
                if not isinstance(mapping, dict):
                    raise ValueError('expected a JSON object {"path/to/image.png": "caption", ...}')
            else:
                rows = [row for row in csv.reader(f) if row]
                if rows and not rows[0][0].lower().endswith(SOURCE_EXTENSIONS):
                    rows = rows[1:]  # header
                if any(len(row) != 2 for row in rows):
                    raise ValueError('expected two columns per row: image path, caption')
                mapping = dict(rows)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DatasetFileError(f'{path}: cannot read captions ({e})') from None
    return {str(k).replace('\\', '/'): str(v) for k, v in mapping.items()}


class ImageSource:
    """Images in a folder or ZIP (sorted by path), with labels and captions from wherever they are.

    Labels come from the source's dataset.json, else from the top-level sub-folder names (sorted and
    numbered from 0) when every image sits in one. Captions come from `captions` (a mapping, e.g. from
    load_caption_mapping), else dataset.json, else a sidecar .txt file beside each image (img2dataset).
    """

    def __init__(self, source: str, max_images: int | None = None, captions: dict[str, str] | None = None) -> None:
        self.source = str(source)
        self._zip: zipfile.ZipFile | None = None
        if os.path.isdir(self.source):
            fnames = {
                os.path.relpath(os.path.join(root, f), self.source).replace(os.sep, '/')
                for root, _dirs, files in os.walk(self.source, followlinks=True)
                for f in files
            }
        elif os.path.isfile(self.source):
            try:
                self._zip = zipfile.ZipFile(self.source)
            except (zipfile.BadZipFile, OSError) as e:
                raise DatasetFileError(f'{self.source}: not a folder or a valid ZIP file ({e})') from None
            fnames = {name for name in self._zip.namelist() if not name.endswith('/')}
        else:
            raise DatasetFileError(f'{self.source}: no such folder or ZIP file')
        self._fnames = fnames
        self.relpaths = sorted(f for f in fnames if f.lower().endswith(SOURCE_EXTENSIONS))[:max_images]
        if not self.relpaths:
            raise DatasetFileError(f'{self.source}: contains no images ({", ".join(SOURCE_EXTENSIONS)})')
        metadata = self._load_metadata() if 'dataset.json' in fnames else {}
        self.labels = self._find_labels(metadata.get('labels'))
        self.captions = {**dict(metadata.get('captions') or []), **(captions or {})}

    def describe(self, relpath: str) -> str:
        return os.path.join(self.source, relpath) if self._zip is None else f'{self.source}:{relpath}'

    def read(self, relpath: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(relpath)
            with open(os.path.join(self.source, relpath), 'rb') as f:
                return f.read()
        except _DECODE_ERRORS as e:
            raise DatasetFileError(f'{self.describe(relpath)}: cannot be read ({e})') from None

    def _load_metadata(self) -> dict:
        try:
            metadata = json.loads(self.read('dataset.json').decode('utf-8'))
            if not isinstance(metadata, dict):
                raise ValueError('expected a JSON object')
            return {key: dict(metadata.get(key) or []) for key in ('labels', 'captions')}
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise DatasetFileError(f'{self.describe("dataset.json")}: malformed ({e}); fix or delete it') from None

    def _find_labels(self, labels: dict | None) -> dict[str, int] | None:
        if labels:
            missing = [relpath for relpath in self.relpaths if relpath not in labels]
            if missing:
                raise DatasetFileError(
                    f'{self.describe("dataset.json")}: no label for {missing[0]}; '
                    f'add it to "labels" or delete dataset.json'
                )
            bad = [
                relpath
                for relpath in self.relpaths
                if isinstance(labels[relpath], bool) or not isinstance(labels[relpath], int)
            ]
            if bad:
                raise DatasetFileError(
                    f'{self.describe("dataset.json")}: label of {bad[0]} is {labels[bad[0]]!r}; '
                    f'labels must be class indices 0, 1, 2, ...'
                )
            return {relpath: labels[relpath] for relpath in self.relpaths}
        if all('/' in relpath for relpath in self.relpaths):
            classes = sorted({relpath.split('/')[0] for relpath in self.relpaths})
            return {relpath: classes.index(relpath.split('/')[0]) for relpath in self.relpaths}
        return None

    def folder_label_note(self) -> str | None:
        """Why images in class sub-folders got no labels: some images lie outside them (None when not so)."""
        loose = [relpath for relpath in self.relpaths if '/' not in relpath]
        if self.labels is not None or not loose or len(loose) == len(self.relpaths):
            return None
        return (
            f'{len(loose)} of {len(self.relpaths)} images ({loose[0]}{", ..." if len(loose) > 1 else ""}) lie outside '
            f'the sub-folders, so the folder names give no class labels; move them into class folders, or remove '
            f'them, to label the data'
        )

    def caption(self, relpath: str) -> str:
        if relpath in self.captions:
            return str(self.captions[relpath])
        sidecar = os.path.splitext(relpath)[0] + '.txt'
        return self.read(sidecar).decode('utf-8').strip() if sidecar in self._fnames else ''

    def __len__(self) -> int:
        return len(self.relpaths)

    def __iter__(self) -> Iterator[SourceImage]:
        for relpath in self.relpaths:
            image = decode_image(self.read(relpath), self.describe(relpath))
            label = self.labels[relpath] if self.labels is not None else None
            yield SourceImage(relpath, image, label, self.caption(relpath))


# ---- transforms ----


def parse_resolution(s: str) -> tuple[int, int]:
    """'64' -> (64, 64); '512x256' -> (512, 256) as (width, height)."""
    match = re.fullmatch(r'\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?', s)
    if not match or int(match.group(1)) < 1 or (match.group(2) is not None and int(match.group(2)) < 1):
        raise ValueError(f'--resolution={s}: expected N or WxH with sides of 1 or more, e.g. 64 or 512x256')
    width = int(match.group(1))
    return width, int(match.group(2)) if match.group(2) is not None else width


def _resize(image: np.ndarray, width: int, height: int, resample: int = Image.Resampling.LANCZOS) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return np.array(Image.fromarray(image).resize((width, height), resample))


def center_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Largest centred box with the aspect ratio width:height, resized to width x height."""
    h, w = image.shape[:2]
    crop_w, crop_h = (
        (min(w, round(h * width / height)), h) if w * height >= h * width else (w, min(h, round(w * height / width)))
    )
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return _resize(image[top : top + crop_h, left : left + crop_w], width, height)


def center_crop_dhariwal(image: np.ndarray, size: int) -> np.ndarray:
    """ADM's ImageNet crop (Dhariwal & Nichol 2021), as EDM2 prepares ImageNet: halve by box filter while the
    short side >= 2*size, bicubic-resize the short side to `size`, then crop the centre size x size."""
    img = Image.fromarray(image)
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    array = np.array(img)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def make_transform(transform: str | None, width: int | None, height: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """The image transform of `convert`; raises ValueError for an impossible combination."""
    if transform is None:
        if width is None:
            return lambda image: image
        return lambda image: _resize(image, width, height)
    if transform not in TRANSFORMS:
        raise ValueError(f'unknown transform {transform!r}; expected one of {", ".join(TRANSFORMS)}')
    if width is None:
        raise ValueError(f'--transform={transform} needs --resolution')
    if transform != 'center-crop-wide' and width != height:
        raise ValueError(
            f'--transform={transform} makes square images but --resolution is {width}x{height}; '
            f'use --transform=center-crop-wide'
        )
    if transform == 'center-crop-dhariwal':
        return lambda image: center_crop_dhariwal(image, width)
    return lambda image: center_crop(image, width, height)
