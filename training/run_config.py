"""From a training preset and command-line options to the keyword arguments of training_loop(): the
dataset, encoder, network, loss, optimiser, learning-rate and EMA configuration of a run."""

import os

import torch

import dnnlib
from torch_utils import distributed as dist
from training import dataset as dataset_mod
from training.backbones import BackboneError, preset_kwargs
from training.dataset_io import write_synthetic_dataset
from training.precision import PrecisionError, resolve_precision, use_fp16_of
from training.presets_train import TRAIN_PRESETS
from training.shard_files import is_shard_spec


class RunConfigError(Exception):
    """The options do not make a run; the message is one sentence for the user."""


def encoder_for_channels(num_channels: int, data: str, vae: str) -> dict:
    """Pixels train through the RGB encoder, 8-channel NPY latents through the Stable Diffusion VAE."""
    if num_channels in (1, 3):
        return dict(class_name='training.encoders.StandardRGBEncoder')
    if num_channels == 8:
        # Snapshots store the VAE's name, so a local folder must stay findable from any working directory.
        vae_name = os.path.abspath(vae) if os.path.isdir(vae) else vae
        return dict(class_name='training.encoders.StabilityVAEEncoder', vae_name=vae_name)
    raise RunConfigError(f'{data}: items have {num_channels} channels; expected 3 (RGB pixels) or 8 (VAE latents).')


def ensure_synthetic_dataset(spec: dnnlib.EasyDict) -> str:
    """The built-in shapes dataset for the demo presets, made once in the cache and reused."""
    path = dnnlib.make_cache_dir_path('datasets', f'shapes-{spec.resolution}px-{spec.num_images}.zip')
    if dist.get_rank() == 0 and not os.path.isfile(path):
        dist.print0(f'Making the built-in shapes dataset: {path}')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_synthetic_dataset(path, resolution=spec.resolution, num_images=spec.num_images, seed=0)
    dist.barrier()
    return path


def text_encoder_kwargs(p: dnnlib.EasyDict, network_class: str) -> dict:
    """TextPrecond options of --text-encoder and --tokenizer, as absolute paths (snapshots store them)."""
    kwargs = {}
    for opt, key in (('text_encoder', 'text_encoder_path'), ('tokenizer', 'tokenizer_path')):
        if p.get(opt) is None:
            continue
        flag = '--' + opt.replace('_', '-')
        if not network_class.endswith('.TextPrecond'):
            text_presets = [
                name
                for name, row in TRAIN_PRESETS.items()
                if row.get('network_kwargs', {}).get('class_name', '').endswith('.TextPrecond')
            ]
            raise RunConfigError(
                f'{flag} applies to text-to-image and super-resolution presets only ({", ".join(text_presets)}).'
            )
        if not os.path.isdir(p[opt]):
            raise RunConfigError(
                f'{flag}: {p[opt]} is not a folder; give the folder a Hugging Face save_pretrained wrote.'
            )
        kwargs[key] = os.path.abspath(p[opt])
    return kwargs


def backbone_kwargs(p: dnnlib.EasyDict, resolution: int, precision: bool | str) -> tuple[dict, dict]:
    """Network and loss options of --arch and --formulation (EDM2's Precond and loss for unet/edm)."""
    if (p.get('arch', 'unet'), p.get('formulation', 'edm')) != ('unet', 'edm') and 'network_kwargs' in p:
        raise RunConfigError('--arch and --formulation do not apply to this preset; it builds its own network.')
    try:
        return preset_kwargs(p, resolution, use_fp16=precision)
    except BackboneError as e:
        raise RunConfigError(str(e)) from e


def dataset_kwargs(p: dnnlib.EasyDict, data: str) -> dnnlib.EasyDict:
    """ImageFolderDataset for a folder or ZIP, ShardDataset for tar shards, plus the preset's options."""
    kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=p.cond)
    row_kwargs = dict(p.get('dataset_kwargs', {}))
    if not is_shard_spec(data):
        for opt in ('filter', 'resolution', 'upscale'):
            if p.get(opt):
                raise RunConfigError(f'--{opt} applies to tar shards only; {data} is a folder or ZIP.')
        return dnnlib.EasyDict(kwargs, **row_kwargs)  # A preset may name another class and its options.
    if 'class_name' in row_kwargs:
        raise RunConfigError(f'The preset reads its data with {row_kwargs["class_name"]}, not from shards.')
    kwargs.update(
        class_name='training.shards.ShardDataset',
        filters=list(p.get('filter') or []),
        resolution=p.get('resolution'),
        upscale=bool(p.get('upscale')),
        shuffle=p.get('shuffle', 1000),
        random_seed=p.seed,
    )
    return dnnlib.EasyDict(kwargs, **row_kwargs)


def setup_training_config(preset: str | None, data: str | None, **opts) -> dnnlib.EasyDict:
    """Resolve preset and command-line options into the keyword arguments of training_loop()."""
    if preset is not None and preset not in TRAIN_PRESETS:
        raise RunConfigError(f'Unknown preset {preset!r}; choose one of: {", ".join(TRAIN_PRESETS)}.')
    p = dnnlib.EasyDict(TRAIN_PRESETS.get(preset, {}))
    for key, value in opts.items():
        if value is not None:
            p[key] = value
    missing = [k for k in ('duration', 'batch', 'channels', 'lr', 'decay') if k not in p]
    if missing:
        raise RunConfigError(
            f'Without --preset, give {", ".join("--" + k for k in missing)} (presets: {", ".join(TRAIN_PRESETS)}).'
        )
    text_kwargs = text_encoder_kwargs(p, p.get('network_kwargs', {}).get('class_name', ''))
    if data is None:
        if 'synthetic' not in p:
            raise RunConfigError(
                f'--data is required with preset {preset!r}; only the demo presets make their own data.'
            )
        data = ensure_synthetic_dataset(p.synthetic)

    c = dnnlib.EasyDict()
    c.dataset_kwargs = dataset_kwargs(p, data)
    try:
        ds = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
    except dataset_mod.DatasetError as e:
        raise RunConfigError(str(e)) from e
    if p.cond and not ds.has_labels and not p.get('dataset_kwargs'):
        raise RunConfigError(f'{data} has no class labels (dataset.json "labels"); train with --cond=False.')
    if c.dataset_kwargs.class_name == 'training.shards.ShardDataset' and c.dataset_kwargs.use_labels:
        c.dataset_kwargs.label_dim = ds.label_dim  # Found by reading every shard's labels: once is enough.
    c.encoder_kwargs = dnnlib.EasyDict(encoder_for_channels(ds.num_channels, data, p.vae))
    c.data_loader_kwargs = dnnlib.EasyDict(
        num_workers=p.workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if p.workers else None,
        persistent_workers=p.workers > 0,
    )
    try:
        precision = resolve_precision(p.get('precision'), p.get('fp16'), p.get('bf16'), dist.device())
    except PrecisionError as e:
        raise RunConfigError(str(e)) from e
    c.network_kwargs, c.loss_kwargs = backbone_kwargs(p, ds.resolution, use_fp16_of(precision))
    c.network_kwargs.update(p.get('network_kwargs', {}))  # A preset may name another class and its options.
    c.network_kwargs.update(text_kwargs)
    if c.loss_kwargs.class_name == 'training.loss.EDM2Loss':
        c.loss_kwargs.update({key: p[key] for key in ('P_mean', 'P_std') if key in p})  # Else the loss's defaults.
    c.loss_kwargs.update(p.get('loss_kwargs', {}))
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', betas=(0.9, 0.99), eps=1e-8)
    c.optimizer_kwargs.update(p.get('optimizer_kwargs', {}))
    c.lr_kwargs = dnnlib.EasyDict(
        func_name='training.loss.learning_rate_schedule',
        ref_lr=p.lr,
        ref_batches=p.decay,
        rampup_Mimg=p.get('rampup', 10),
    )
    c.ema_kwargs = dnnlib.EasyDict(class_name='training.phema.PowerFunctionEMA', stds=[0.050, 0.100])
    c.ema_kwargs.update(p.get('ema_kwargs', {}))
    c.update(
        seed=p.seed,
        batch_size=p.batch,
        batch_gpu=p.get('batch_gpu') or None,
        total_nimg=p.duration,
        status_nimg=p.get('status', 128 << 10),
        snapshot_nimg=p.get('snapshot', 8 << 20),
        checkpoint_nimg=p.get('checkpoint', 128 << 20),
        loss_scaling=p.ls,
        cudnn_benchmark=p.bench,
        snapshot_fp32=p.snapshot_fp32,
        sample_steps=p.get('sample_steps', 32),
    )
    c.update({key: True for key in ('tf32', 'compile_net', 'checkpointing') if p.get(key)})  # Omitted when off.
    return c
