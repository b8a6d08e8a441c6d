"""Make edm2x datasets: a folder or an uncompressed ZIP of PNGs plus dataset.json.

Run `python dataset_tool.py --help` for the commands and examples. The file formats, image reading and
crops live in training/dataset_io.py; this file is the command line.
"""

import json
import os
import re
import shutil

import click
import numpy as np

import dnnlib
from training.dataset_io import (
    TRANSFORMS,
    DatasetFileError,
    DatasetWriter,
    ImageSource,
    check_new_dest,
    decode_image,
    item_relpath,
    load_caption_mapping,
    make_transform,
    parse_resolution,
    write_synthetic_dataset,
)
from training.shard_files import ShardError, is_shard_spec
from training.shard_writer import encode_shards, make_shards

# ---- command line ----


class _Commands(click.Group):
    """The command group; a DatasetFileError from training/dataset_io.py becomes a one-line CLI error."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (DatasetFileError, ShardError) as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Commands)
def cli() -> None:
    """Make edm2x datasets (folder or uncompressed ZIP of PNGs with dataset.json, or tar shards).

    \b
    # The built-in demo data: 10K coloured shapes at 32x32 with labels and captions.
    python dataset_tool.py synth --dest=datasets/shapes-32.zip --resolution=32 --max-images=10K
    \b
    # ImageNet 64x64 the way ADM and EDM2 prepare it (labels from the class sub-folders).
    python dataset_tool.py convert --source=downloads/imagenet/train --dest=datasets/img64.zip \\
        --resolution=64 --transform=center-crop-dhariwal
    \b
    # ImageNet 512x512 latents for the edm2-img512-* presets: crop, then encode with the SD VAE.
    python dataset_tool.py convert --source=downloads/imagenet/train --dest=datasets/img512.zip \\
        --resolution=512 --transform=center-crop-dhariwal
    python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
    \b
    # Tar shards (WebDataset, img2dataset's layout) of 10K samples each, then latent shards.
    python dataset_tool.py shards --source=datasets/img512.zip --dest=datasets/img512-shards --per-shard=10K
    python dataset_tool.py encode --source=datasets/img512-shards --dest=datasets/img512-sd-shards
    """


def _parse_count(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        count = dnnlib.util.parse_nimg(value)
    except ValueError:
        raise click.BadParameter(f'{value!r} is not a count, e.g. 1000, 10K or 8Ki') from None
    if count < 1:
        raise click.BadParameter(f'must be at least 1, got {value!r}')
    return count


@cli.command()
@click.option('--dest', metavar='PATH', required=True, help='Output ZIP (ends in .zip) or new folder.')
@click.option(
    '--resolution',
    metavar='INT',
    type=click.IntRange(min=4, max=4096),
    default=32,
    show_default=True,
    help='Image size in pixels.',
)
@click.option(
    '--max-images',
    metavar='INT',
    callback=_parse_count,
    default='10000',
    show_default=True,
    help='Number of images (suffixes K M Ki Mi).',
)
@click.option(
    '--seed',
    metavar='INT',
    type=int,
    default=0,
    show_default=True,
    help='Random seed; item i depends only on it and i.',
)
@click.option(
    '--hold-out',
    'hold_out',
    metavar='TEXT',
    multiple=True,
    help="Leave out every scene whose caption contains TEXT, e.g. 'red circle' (repeatable).",
)
def synth(dest: str, resolution: int, max_images: int, seed: int, hold_out: tuple[str, ...]) -> None:
    """Write the built-in coloured-shapes dataset with labels (shape) and captions.

    \b
    python dataset_tool.py synth --dest=datasets/shapes-32.zip --resolution=32 --max-images=10K
    # Without two combinations, to test whether a text net composes words it never saw together
    python dataset_tool.py synth --dest=datasets/shapes-16-ho.zip --resolution=16 \\
        --hold-out='red circle' --hold-out='blue square on a yellow background'
    """
    write_synthetic_dataset(dest, resolution=resolution, num_images=max_images, seed=seed, hold_out=hold_out)


@cli.command()
@click.option('--source', metavar='PATH', required=True, help='Folder or ZIP of images (sub-folders become labels).')
@click.option('--dest', metavar='PATH', required=True, help='Output ZIP (ends in .zip) or new folder.')
@click.option('--resolution', metavar='N|WxH', help='Output size, e.g. 64 or 512x256 (default: keep).')
@click.option('--transform', metavar='NAME', type=click.Choice(TRANSFORMS), help='Crop: ' + ', '.join(TRANSFORMS) + '.')
@click.option('--max-images', metavar='INT', callback=_parse_count, help='Convert at most this many (first by path).')
@click.option(
    '--captions',
    'captions_file',
    metavar='JSON|CSV',
    default=None,
    help='Captions by image path (JSON object or CSV rows path,caption).',
)
def convert(
    source: str,
    dest: str,
    resolution: str | None,
    transform: str | None,
    max_images: int | None,
    captions_file: str | None,
) -> None:
    """Convert a folder or ZIP of images to an edm2x dataset.

    \b
    python dataset_tool.py convert --source=downloads/imagenet/train --dest=datasets/img64.zip \\
        --resolution=64 --transform=center-crop-dhariwal
    """
    try:
        width, height = parse_resolution(resolution) if resolution is not None else (None, None)
        transform_fn = make_transform(transform, width, height)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    captions = load_caption_mapping(captions_file) if captions_file is not None else None
    images = ImageSource(source, max_images=max_images, captions=captions)
    note = images.folder_label_note()
    if note:
        click.echo(f'Note: {note}.')
    first_shape, stretched = None, 0
    with DatasetWriter(dest) as writer:
        for idx, item in enumerate(dnnlib.util.progress_bar(images, desc='convert', unit='img')):
            if transform is None and width is not None and item.image.shape[1] * height != item.image.shape[0] * width:
                stretched += 1  # Resizing alone changes the image's aspect ratio.
            image = transform_fn(item.image)
            first_shape = first_shape or (image.shape, item.relpath)
            if image.shape != first_shape[0]:
                raise click.ClickException(
                    f'{images.describe(item.relpath)}: image is {image.shape[1]}x{image.shape[0]} but '
                    f'{first_shape[1]} is {first_shape[0][1]}x{first_shape[0][0]}; pass --resolution to resize all'
                )
            writer.add_image(item_relpath(idx), image, label=item.label, caption=item.caption)
    if stretched:
        click.echo(
            f'Note: {stretched} images were stretched to {width}x{height} (their aspect ratio differs); pass '
            f'--transform=center-crop (or center-crop-wide) to crop them instead.'
        )


@cli.command()
@click.option('--source', metavar='PATH', required=True, help='Folder or ZIP of images, or tar shards to re-shard.')
@click.option('--dest', metavar='DIR', required=True, help='New folder for 000000.tar, 000001.tar, ...')
@click.option(
    '--per-shard',
    metavar='INT',
    callback=_parse_count,
    default='10000',
    show_default=True,
    help='Samples per shard (suffixes K M Ki Mi).',
)
@click.option('--max-images', metavar='INT', callback=_parse_count, help='Write at most this many (first by path).')
def shards(source: str, dest: str, per_shard: int, max_images: int | None) -> None:
    """Write tar shards (WebDataset) as img2dataset lays them out: the image file's bytes, txt caption, cls
    label and json metadata with original_width and original_height.

    \b
    python dataset_tool.py shards --source=datasets/shapes-32.zip --dest=datasets/shapes-shards --per-shard=1K
    """
    with dnnlib.util.progress_bar(desc='shards', unit='img') as progress:
        total = make_shards(source, dest, per_shard, max_images=max_images, progress=progress.update)
    click.echo(f'{dest}: {total} samples in {-(-total // per_shard)} shards')


def _check_partial(partial: str, settings: dict, resume: bool) -> None:
    """An existing folder of finished items beside --dest may only be continued, and only with its settings."""
    if not os.path.isdir(partial):
        return
    if not resume:
        raise click.ClickException(
            f'{partial}: holds an interrupted encode; pass --resume to continue it, or delete it'
        )
    _check_settings(os.path.join(partial, 'settings.json'), settings)


def _check_settings(settings_path: str, settings: dict) -> None:
    """An encode continued in the folder of `settings_path` must use the settings recorded there."""
    folder = os.path.dirname(settings_path)
    try:
        with open(settings_path, encoding='utf-8') as f:
            previous = json.load(f)
    except (OSError, ValueError) as e:
        raise click.ClickException(f'{settings_path}: unreadable ({e}); delete {folder} and start over') from None
    for key, value in settings.items():
        if key in previous and previous[key] != value:  # (Folders from before a setting was recorded lack it.)
            raise click.ClickException(
                f'{folder}: was started with {key} {previous.get(key)!r}, not {value!r}; '
                f'resume with the same --{key.replace("_", "-")} or delete it'
            )


def _load_images(images: ImageSource, relpaths: list[str], shape: tuple) -> np.ndarray:
    batch = []
    for relpath in relpaths:
        image = decode_image(images.read(relpath), images.describe(relpath))
        if image.shape != shape:
            raise click.ClickException(
                f'{images.describe(relpath)}: image is {image.shape[1]}x{image.shape[0]} but the '
                f'first is {shape[1]}x{shape[0]}; make them one size with convert --resolution'
            )
        batch.append(image.transpose(2, 0, 1))
    return np.stack(batch)


def _vae(model_url: str, batch: int, device: str | None) -> tuple:
    """(the Stable Diffusion VAE, the torch device it runs on: `device`, else cuda if available)."""
    import torch

    from torch_utils.host_memory import keep_freed_memory
    from training.encoders import StabilityVAEEncoder

    try:
        torch_device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        if torch_device.type == 'cuda' and not torch.cuda.is_available():
            raise click.ClickException(f'--device={device}: CUDA is not available here; use --device=cpu')
        keep_freed_memory(torch_device)  # CPU: the VAE encodes ~25 % faster (docs/benchmarks.md)
        encoder = StabilityVAEEncoder(vae_name=model_url, batch_size=batch)
        encoder.init(torch_device)
    except (RuntimeError, OSError) as e:
        raise click.ClickException(re.sub(r'\s+', ' ', str(e))) from None
    return encoder, torch_device


@cli.command()
@click.option(
    '--model-url',
    metavar='ID|DIR',
    default='stabilityai/sd-vae-ft-mse',
    show_default=True,
    help='VAE: Hugging Face hub id or a folder saved with AutoencoderKL.save_pretrained.',
)
@click.option(
    '--source', metavar='PATH', required=True, help='Pixel dataset: folder or ZIP of equal-size images, or tar shards.'
)
@click.option(
    '--dest', metavar='PATH', required=True, help='Output ZIP (ends in .zip) or folder of NPY latents (of shards).'
)
@click.option('--max-images', metavar='INT', callback=_parse_count, help='Encode at most this many (first by path).')
@click.option('--resume', is_flag=True, help='Continue an interrupted run from the items finished in DEST.partial.')
@click.option(
    '--batch', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True, help='Images per VAE call.'
)
@click.option(
    '--device', metavar='DEVICE', default=None, help='Torch device, e.g. cpu or cuda:1  [default: cuda if available]'
)
def encode(
    model_url: str, source: str, dest: str, max_images: int | None, resume: bool, batch: int, device: str | None
) -> None:
    """Encode a pixel dataset with the Stable Diffusion VAE (Rombach et al. 2022) into NPY latents.

    Each item stores 8 float32 channels, the posterior mean and std; labels and captions are carried over.
    Finished items collect in DEST.partial beside DEST, so an interrupted run continued with --resume
    makes the same dataset as an uninterrupted one (with the same --batch).

    \b
    python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
    python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip --resume

    From tar shards, each shard becomes a latent shard of the same name in the folder DEST; shards that exist
    there are finished and skipped, so re-running resumes. Under torchrun each rank encodes its own shards.

    \b
    torchrun --nproc_per_node=8 dataset_tool.py encode --source=data/{000000..000999}.tar --dest=data-sd
    """
    import torch

    if is_shard_spec(source):
        rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
        if device is None and torch.cuda.is_available():
            device = f'cuda:{os.environ.get("LOCAL_RANK", 0)}'
        # Finished shards are kept and skipped, so a re-run resumes: only with the settings they were made with.
        settings_path = os.path.join(dest, 'encode-settings.json')
        settings = {'model_url': model_url, 'source': source, 'batch': batch}
        if os.path.isfile(settings_path):
            _check_settings(settings_path, settings)
        encoder, torch_device = _vae(model_url, batch, device)
        if rank == 0 and not os.path.isfile(settings_path):
            os.makedirs(dest, exist_ok=True)
            with dnnlib.util.atomic_write(settings_path, 'wt') as f:
                json.dump(settings, f)

        def encode_batch(pixels: np.ndarray) -> np.ndarray:
            return encoder.encode_pixels(torch.from_numpy(pixels).to(torch_device)).cpu().numpy()

        written = encode_shards(source, dest, encode_batch, batch, rank=rank, world=world)
        click.echo(f'rank {rank}: {len(written)} latent shards written to {dest}')
        return
    images = ImageSource(source, max_images=max_images)
    partial = os.path.abspath(dest).rstrip(os.sep) + '.partial'
    # The batch too: the VAE's float rounding differs between batch sizes, so a resumed encode keeps its own.
    settings = {'model_url': model_url, 'source': os.path.abspath(source), 'batch': batch}
    _check_partial(partial, settings, resume)
    check_new_dest(dest)  # before the VAE loads; DatasetWriter checks again as it starts
    encoder, device = _vae(model_url, batch, device)
    shape = decode_image(images.read(images.relpaths[0]), images.describe(images.relpaths[0])).shape
    factor = encoder.downsampling
    if shape[0] % factor or shape[1] % factor:
        raise click.ClickException(
            f'{images.describe(images.relpaths[0])}: image is {shape[1]}x{shape[0]}, but the VAE '
            f'needs sides divisible by {factor}; resize with convert --resolution'
        )
    if not os.path.isdir(partial):
        os.makedirs(partial)
        with dnnlib.util.atomic_write(os.path.join(partial, 'settings.json'), 'wt') as f:
            json.dump(settings, f)

    def item_path(idx: int) -> str:
        return os.path.join(partial, item_relpath(idx, 'npy'))

    # Items are written in order, each atomically; restart at the batch holding the first missing one,
    # so that every batch the VAE sees is the one an uninterrupted run would have given it.
    done = 0
    while done < len(images) and os.path.isfile(item_path(done)):
        done += 1
    start = done - done % batch
    with dnnlib.util.progress_bar(total=len(images), initial=start, desc='encode', unit='img') as progress:
        for first in range(start, len(images), batch):
            pixels = _load_images(images, images.relpaths[first : first + batch], shape)
            latents = encoder.encode_pixels(torch.from_numpy(pixels).to(device)).cpu().numpy()
            for idx, array in enumerate(latents, start=first):
                os.makedirs(os.path.dirname(item_path(idx)), exist_ok=True)
                with dnnlib.util.atomic_write(item_path(idx), 'wb') as f:
                    np.save(f, array.astype(np.float32), allow_pickle=False)
            progress.update(len(latents))

    with DatasetWriter(dest) as writer:
        for idx, relpath in enumerate(images.relpaths):
            label = images.labels[relpath] if images.labels is not None else None
            writer.add_array(
                item_relpath(idx, 'npy'), np.load(item_path(idx)), label=label, caption=images.caption(relpath)
            )
    shutil.rmtree(partial)


if __name__ == '__main__':
    cli()
