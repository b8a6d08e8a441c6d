"""From a training preset and command-line options to the keyword arguments of training_loop(): the
dataset, encoder, network, loss, optimiser, learning-rate and EMA configuration of a run."""

import json
import os
from typing import Any

import torch

import dnnlib
from torch_utils import distributed as dist
from training import dataset as dataset_mod
from training.backbones import TEXT_BACKBONES, BackboneError, preset_kwargs
from training.dataset_io import write_synthetic_dataset
from training.faults import TrainingError
from training.networks_text import TEXT_LENGTH
from training.output_paths import file_on_the_way
from training.precision import PrecisionError, resolve_precision, use_fp16_of
from training.presets_train import TRAIN_PRESETS
from training.shard_files import is_shard_spec
from training.text import make_tokenizer
from training.training_loop import split_batch


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


def check_given_options(p: dnnlib.EasyDict, given: set[str]) -> None:
    """RunConfigError for an option set on the command line (`given`) that the run's architecture and formulation
    do not use; a preset's own values are not checked."""
    arch, formulation = p.get('arch', 'unet'), p.get('formulation', 'edm')
    sigma_options = [f'--{key}' for key in ('P_mean', 'P_std') if key in given]
    if formulation == 'ddpm' and sigma_options:
        verb = 'applies' if len(sigma_options) == 1 else 'apply'
        raise RunConfigError(
            f'{" and ".join(sigma_options)} {verb} to --formulation=edm only; ddpm draws its timesteps uniformly.'
        )
    if arch == 'dit' and 'dropout' in given:
        raise RunConfigError('--dropout does not apply to --arch=dit, which has none (--label-dropout drops labels).')
    if arch == 'unet' and 'patch' in given:
        raise RunConfigError('--patch applies to the transformers (--arch=dit or mp-dit), not to --arch=unet.')


def backbone_kwargs(p: dnnlib.EasyDict, resolution: int, precision: bool | str) -> tuple[dict, dict]:
    """Network and loss options of --arch and --formulation (EDM2's Precond and loss for unet/edm) under the
    preset's own network options. A text-to-image preset takes --arch=mp-dit: its MP-DiT is TextMPDiT."""
    arch, formulation = p.get('arch', 'unet'), p.get('formulation', 'edm')
    row = p.get('network_kwargs', {})
    text_base = row.get('class_name', '').endswith('.TextPrecond') and not row.get('lowres')
    if row and (arch, formulation) != ('unet', 'edm'):
        if not text_base:
            raise RunConfigError('--arch and --formulation do not apply to this preset; it builds its own network.')
        if (arch, formulation) != ('mp-dit', 'edm'):
            raise RunConfigError('Text-to-image presets train --arch=unet or --arch=mp-dit with --formulation=edm.')
    if p.get('label_dropout') and (row or not p.get('cond', True)):
        raise RunConfigError('--label-dropout applies to class-conditional training (--cond=True) of class presets.')
    try:
        network, loss = preset_kwargs(p, resolution, use_fp16=precision)
    except BackboneError as e:
        raise RunConfigError(str(e)) from e
    network.update(row)
    if text_base and arch == 'mp-dit':
        network.backbone = TEXT_BACKBONES[arch]
    return network, loss


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
    if p.get('upscale') and not p.get('resolution'):
        raise RunConfigError('--upscale applies with --resolution (it enlarges shard images smaller than that).')
    kwargs.update(
        class_name='training.shards.ShardDataset',
        filters=list(p.get('filter') or []),
        resolution=p.get('resolution'),
        upscale=bool(p.get('upscale')),
        shuffle=p.get('shuffle', 1000),
        random_seed=p.seed,
    )
    return dnnlib.EasyDict(kwargs, **row_kwargs)


def fitted_text_length(p: dnnlib.EasyDict, dataset: Any) -> dict:
    """A built-in tokenizer's context (`text_tokens` bytes or words), grown to hold the data's longest caption
    (start token included, rounded up to 16) so that no caption loses its end (a caption's last words, e.g.
    where the object is, would otherwise never reach the net). Hugging Face tokenizers and tar shards keep the
    preset's."""
    row = p.get('network_kwargs', {})
    text_net = row.get('class_name', '').endswith('.TextPrecond') and row.get('text_channels', 1)
    if not text_net or p.get('tokenizer') or p.get('text_encoder') or not hasattr(dataset, 'caption_texts'):
        return {}
    length = row.get('text_length', TEXT_LENGTH)
    tokenizer = make_tokenizer(length, None, row.get('text_tokens', 'bytes'))
    longest = max((tokenizer.num_tokens(caption) for caption in dataset.caption_texts()), default=1)
    if longest <= length:
        return {}
    fitted = -(-longest // 16) * 16
    dist.print0(f'Captions reach {longest} tokens: text_length {length} -> {fitted}, so that none is cut short.')
    return dict(text_length=fitted)


def setup_training_config(preset: str | None, data: str | None, **opts) -> dnnlib.EasyDict:
    """Resolve preset and command-line options into the keyword arguments of training_loop()."""
    return setup_training_run(preset, data, **opts)[0]


def setup_training_run(preset: str | None, data: str | None, **opts) -> tuple[dnnlib.EasyDict, Any]:
    """setup_training_config's keyword arguments and the dataset their dataset_kwargs name, constructed once
    (listing a folder of a million images, or reading every shard's labels, is slow): check_dataset and
    training_loop take it instead of constructing their own."""
    if preset is not None and preset not in TRAIN_PRESETS:
        raise RunConfigError(f'Unknown preset {preset!r}; choose one of: {", ".join(TRAIN_PRESETS)}.')
    p = dnnlib.EasyDict(TRAIN_PRESETS.get(preset, {}))
    for key, value in opts.items():
        if value is not None:
            p[key] = value
    check_given_options(p, {key for key, value in opts.items() if value is not None})
    missing = [k for k in ('duration', 'batch', 'channels', 'lr', 'decay') if k not in p]
    if missing:
        raise RunConfigError(
            f'Without --preset, give {", ".join("--" + k for k in missing)} (presets: {", ".join(TRAIN_PRESETS)}).'
        )
    try:
        split_batch(p.batch, p.get('batch_gpu') or None, dist.get_world_size())
    except TrainingError as e:
        raise RunConfigError(str(e)) from e
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
    c.network_kwargs.update(text_kwargs, **fitted_text_length(p, ds))
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
        snapshot_format=p.get('snapshot_format', 'pkl'),
        sample_steps=p.get('sample_steps', 32),
        keep_checkpoints=p.get('keep_checkpoints'),
        continue_on_snapshot_error=bool(p.get('continue_on_snapshot_error')),
        max_bad_samples=p.get('max_bad_samples', 10),
    )
    c.update({key: True for key in ('tf32', 'compile_net', 'checkpointing') if p.get(key)})  # Omitted when off.
    return c, ds


# Options a re-run may change without changing what is trained: the schedule of outputs, the run's length,
# how each process splits and loads its batch, how many bad samples it steps over (the stop at
# --max-bad-samples says to raise it and re-run to resume), how many checkpoints it keeps and whether a failed
# snapshot stops it (the disk-space warning and the stop at a full disk advise those), and the snapshots' file
# format and precision (outputs only: float16 snapshots save half the disk). Anything else differing
# from the saved options is refused, also a moved dataset (a new path may hold other images; after a move, edit
# the path in the saved options).
RESUMABLE_KEYS = (
    'total_nimg',
    'status_nimg',
    'snapshot_nimg',
    'checkpoint_nimg',
    'batch_gpu',
    'data_loader_kwargs',
    'cudnn_benchmark',
    'max_bad_samples',
    'keep_checkpoints',
    'continue_on_snapshot_error',
    'snapshot_fp32',
    'snapshot_format',
)

# Resolved option -> the command-line option that sets it, for messages.
_FLAGS = {
    'total_nimg': '--duration',
    'batch_size': '--batch',
    'seed': '--seed',
    'loss_scaling': '--ls',
    'snapshot_fp32': '--snapshot-fp32',
    'dataset_kwargs.path': '--data',
    'dataset_kwargs.use_labels': '--cond',
    'network_kwargs.model_channels': '--channels',
    'network_kwargs.dropout': '--dropout',
    'network_kwargs.label_dropout': '--label-dropout',
    'network_kwargs.use_fp16': '--precision',
    'loss_kwargs.P_mean': '--P_mean',
    'loss_kwargs.P_std': '--P_std',
    'lr_kwargs.ref_lr': '--lr',
    'lr_kwargs.ref_batches': '--decay',
    'encoder_kwargs.vae_name': '--vae',
}


def _flatten(d: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def options_differences(saved: dict, new: dict) -> list[str]:
    """'--flag is OLD there, NEW now' for every option that differs and that a resume may not change; keys
    present on one side only (options added or dropped by another edm2x version) are not compared."""
    old_flat, new_flat = _flatten(saved), _flatten(json.loads(json.dumps(new)))
    found = []
    for key in old_flat.keys() & new_flat.keys():
        if key.split('.')[0] in RESUMABLE_KEYS or old_flat[key] == new_flat[key]:
            continue
        name = f'{_FLAGS[key]} ({key})' if key in _FLAGS else key
        found.append(f'{name} is {old_flat[key]!r} there, {new_flat[key]!r} now')
    return sorted(found)


def check_run_folder(outdir: str, c: dict) -> bool:
    """Whether `outdir` already holds a run, which these options may then continue; touches nothing.
    Raises RunConfigError when `outdir` is a file or its run was trained with other options."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise RunConfigError(f'--outdir={outdir} is a file, not a folder; name a new or existing run folder.')
    if blocker := file_on_the_way(outdir):
        raise RunConfigError(f'--outdir={outdir}: {blocker} is a file, not a folder.')
    path = os.path.join(outdir, 'training_options.json')
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding='utf-8') as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise RunConfigError(f'{path} is unreadable ({e}); restore it, or start the run in a new --outdir.') from None
    differences = options_differences(saved, c)
    if differences:
        raise RunConfigError(
            f'{outdir} holds a run with other settings: {"; ".join(differences)}. Re-run with its settings '
            f'(see {path}) to resume it, or choose another --outdir.'
        )
    return True


def check_dataset(dataset: Any, max_bad_samples: int = 0) -> list[str]:
    """Every image of a folder or ZIP dataset has the same readable size, checked from the file headers
    before a run starts (tar shards are checked as they stream). Up to `max_bad_samples` bad files are skipped
    in training and returned as warning lines naming them (to print once the run's log is open); more stop
    the start."""
    if not isinstance(dataset, dataset_mod.ImageFolderDataset):
        return []
    problems = dataset.validate(decode=False, allow=len(dataset))
    if len(problems) > max_bad_samples:
        others = [problem.split(': ')[0] for problem in problems[1:6]]
        also = f'; also {", ".join(others)}{" ..." if len(problems) > 6 else ""}' if others else ''
        raise RunConfigError(
            f'{problems[0]}{also} ({len(problems)} bad files, more than --max-bad-samples={max_bad_samples}).'
        )
    return [f'Warning: {problem}; training skips it (--max-bad-samples={max_bad_samples}).' for problem in problems]
