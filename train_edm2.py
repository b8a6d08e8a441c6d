"""Train magnitude-preserving diffusion models the EDM2 way (Karras et al., CVPR 2024)."""

import json
import os
import re
import warnings

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from training import dataset as dataset_mod
from training.backbones import ARCHS, FORMULATIONS, BackboneError, preset_kwargs
from training.checkpoint import CheckpointError
from training.dataset_io import write_synthetic_dataset
from training.presets_train import TRAIN_PRESETS
from training.shard_files import is_shard_spec
from training.training_loop import TrainingError, training_loop

warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides')


class NimgType(click.ParamType):
    """Image counts with K/M/G (10^3…) or Ki/Mi/Gi (2^10…) suffixes, e.g. 8Mi."""

    name = 'nimg'

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return dnnlib.util.parse_nimg(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


NIMG = NimgType()


def encoder_for_channels(num_channels: int, data: str, vae: str) -> dict:
    """Pixels train through the RGB encoder, 8-channel NPY latents through the Stable Diffusion VAE."""
    if num_channels in (1, 3):
        return dict(class_name='training.encoders.StandardRGBEncoder')
    if num_channels == 8:
        # Snapshots store the VAE's name, so a local folder must stay findable from any working directory.
        vae_name = os.path.abspath(vae) if os.path.isdir(vae) else vae
        return dict(class_name='training.encoders.StabilityVAEEncoder', vae_name=vae_name)
    raise click.ClickException(
        f'{data}: items have {num_channels} channels; expected 3 (RGB pixels) or 8 (VAE latents).'
    )


def one_line_message(e: Exception) -> str:
    """The user-facing sentence of an error, also when a DataLoader worker wrapped it in its traceback."""
    msg = str(e).strip()
    if 'Original Traceback' in msg:
        msg = msg.splitlines()[-1].split(': ', 1)[-1]
    return re.sub(r'\s+', ' ', msg)


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
            raise click.ClickException(
                f'{flag} applies to text-to-image and super-resolution presets only ({", ".join(text_presets)}).'
            )
        if not os.path.isdir(p[opt]):
            raise click.ClickException(
                f'{flag}: {p[opt]} is not a folder; give the folder a Hugging Face save_pretrained wrote.'
            )
        kwargs[key] = os.path.abspath(p[opt])
    return kwargs


def backbone_kwargs(p: dnnlib.EasyDict, resolution: int, precision: bool | str) -> tuple[dict, dict]:
    """Network and loss options of --arch and --formulation (EDM2's Precond and loss for unet/edm)."""
    if (p.get('arch', 'unet'), p.get('formulation', 'edm')) != ('unet', 'edm') and 'network_kwargs' in p:
        raise click.ClickException('--arch and --formulation do not apply to this preset; it builds its own network.')
    try:
        return preset_kwargs(p, resolution, use_fp16=precision)
    except BackboneError as e:
        raise click.ClickException(str(e)) from e


def dataset_kwargs(p: dnnlib.EasyDict, data: str) -> dnnlib.EasyDict:
    """ImageFolderDataset for a folder or ZIP, ShardDataset for tar shards, plus the preset's options."""
    kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=p.cond)
    row_kwargs = dict(p.get('dataset_kwargs', {}))
    if not is_shard_spec(data):
        for opt in ('filter', 'resolution', 'upscale'):
            if p.get(opt):
                raise click.ClickException(f'--{opt} applies to tar shards only; {data} is a folder or ZIP.')
        return dnnlib.EasyDict(kwargs, **row_kwargs)  # A preset may name another class and its options.
    if 'class_name' in row_kwargs:
        raise click.ClickException(f'The preset reads its data with {row_kwargs["class_name"]}, not from shards.')
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
        raise click.ClickException(f'Unknown preset {preset!r}; choose one of: {", ".join(TRAIN_PRESETS)}.')
    p = dnnlib.EasyDict(TRAIN_PRESETS.get(preset, {}))
    for key, value in opts.items():
        if value is not None:
            p[key] = value
    missing = [k for k in ('duration', 'batch', 'channels', 'lr', 'decay') if k not in p]
    if missing:
        raise click.ClickException(
            f'Without --preset, give {", ".join("--" + k for k in missing)} (presets: {", ".join(TRAIN_PRESETS)}).'
        )
    text_kwargs = text_encoder_kwargs(p, p.get('network_kwargs', {}).get('class_name', ''))
    if data is None:
        if 'synthetic' not in p:
            raise click.ClickException(
                f'--data is required with preset {preset!r}; only the demo presets make their own data.'
            )
        data = ensure_synthetic_dataset(p.synthetic)

    c = dnnlib.EasyDict()
    c.dataset_kwargs = dataset_kwargs(p, data)
    try:
        ds = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
    except dataset_mod.DatasetError as e:
        raise click.ClickException(str(e)) from e
    if p.cond and not ds.has_labels and not p.get('dataset_kwargs'):
        raise click.ClickException(f'{data} has no class labels (dataset.json "labels"); train with --cond=False.')
    if c.dataset_kwargs.class_name == 'training.shards.ShardDataset' and c.dataset_kwargs.use_labels:
        c.dataset_kwargs.label_dim = ds.label_dim  # Found by reading every shard's labels: once is enough.
    c.encoder_kwargs = dnnlib.EasyDict(encoder_for_channels(ds.num_channels, data, p.vae))
    c.data_loader_kwargs = dnnlib.EasyDict(
        num_workers=p.workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if p.workers else None,
        persistent_workers=p.workers > 0,
    )
    precision = 'bf16' if p.bf16 else bool(p.fp16)
    c.network_kwargs, c.loss_kwargs = backbone_kwargs(p, ds.resolution, precision)
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
    return c


@click.command(context_settings=dict(max_content_width=110))
@click.option(
    '--outdir', metavar='DIR', type=str, required=True, help='Run folder; a re-run resumes from its newest checkpoint.'
)
@click.option(
    '--data',
    metavar='ZIP|DIR|SHARDS',
    type=str,
    default=None,
    help="Dataset folder or ZIP, or tar shards ('data/{000000..000099}.tar', a folder or a list file).",
)
@click.option(
    '--filter',
    metavar='EXPR',
    multiple=True,
    help="Keep shard samples whose json metadata satisfies EXPR, e.g. 'original_width>=512' (repeatable).",
)
@click.option(
    '--resolution',
    metavar='INT',
    type=click.IntRange(min=1),
    default=None,
    help='Resize and centre-crop shard images on the fly to this size (as dataset_tool.py convert).',
)
@click.option('--upscale', is_flag=True, help='With --resolution: upscale smaller shard images instead of dropping.')
@click.option(
    '--shuffle',
    metavar='INT',
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help='Shuffle-buffer size of each shard-reading worker (0: file order).',
)
@click.option(
    '--cond', metavar='BOOL', type=bool, default=True, show_default=True, help='Train class-conditional (needs labels).'
)
@click.option(
    '--preset', metavar='STR', type=str, default=None, help=f'Configuration preset: {", ".join(TRAIN_PRESETS)}.'
)
@click.option(
    '--arch',
    metavar='|'.join(ARCHS),
    type=click.Choice(ARCHS),
    default=None,
    help='Backbone: EDM2 MP U-Net, DiT (adaLN-Zero transformer), magnitude-preserving DiT [default: unet or preset].',
)
@click.option(
    '--formulation',
    metavar='|'.join(FORMULATIONS),
    type=click.Choice(FORMULATIONS),
    default=None,
    help='EDM2 preconditioning and loss in sigma, or DDPM timesteps, epsilon and hybrid loss [default: edm or preset].',
)
@click.option(
    '--patch', metavar='INT', type=click.IntRange(min=1), default=None, help='Transformer patch size [default: 2].'
)
@click.option('--duration', metavar='NIMG', type=NIMG, default=None, help='Training duration in images, e.g. 2048Mi.')
@click.option('--batch', metavar='NIMG', type=NIMG, default=None, help='Global batch size in images.')
@click.option(
    '--channels',
    metavar='INT',
    type=click.IntRange(min=1),
    default=None,
    help='U-Net model_channels, transformer width.',
)
@click.option(
    '--dropout', metavar='FLOAT', type=click.FloatRange(0, 1), default=None, help='Dropout probability in blocks.'
)
@click.option('--P_mean', 'P_mean', metavar='FLOAT', type=float, default=None, help='Mean of ln(sigma) in training.')
@click.option(
    '--P_std',
    'P_std',
    metavar='FLOAT',
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help='Std of ln(sigma) in training.',
)
@click.option(
    '--lr',
    metavar='FLOAT',
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help='Reference learning rate alpha_ref.',
)
@click.option(
    '--decay',
    metavar='BATCHES',
    type=click.FloatRange(min=0),
    default=None,
    help='Learning-rate decay time t_ref in batches.',
)
@click.option(
    '--batch-gpu',
    'batch_gpu',
    metavar='NIMG',
    type=NIMG,
    default=None,
    help='Images per device per round (gradient accumulation).',
)
@click.option(
    '--vae',
    metavar='ID|DIR',
    type=str,
    default='stabilityai/sd-vae-ft-mse',
    show_default=True,
    help='VAE of latent (8-channel) datasets: hub id or save_pretrained folder.',
)
@click.option(
    '--text-encoder',
    'text_encoder',
    metavar='DIR',
    type=str,
    default=None,
    help='Text presets: a frozen pretrained Hugging Face text encoder and its tokenizer (local folder) instead of training the MP text encoder.',
)
@click.option(
    '--tokenizer',
    metavar='DIR',
    type=str,
    default=None,
    help='Text presets: a Hugging Face tokenizer (local folder) instead of the byte tokenizer.',
)
@click.option(
    '--fp16', metavar='BOOL', type=bool, default=True, show_default=True, help='Mixed precision (float16) on CUDA.'
)
@click.option(
    '--bf16',
    metavar='BOOL',
    type=bool,
    default=False,
    show_default=True,
    help='bfloat16 compute, also on CPU (fast only with bf16 instructions).',
)
@click.option(
    '--ls',
    metavar='FLOAT',
    type=click.FloatRange(min=0, min_open=True),
    default=1,
    show_default=True,
    help='Loss scaling.',
)
@click.option('--bench', metavar='BOOL', type=bool, default=True, show_default=True, help='cuDNN benchmarking.')
@click.option(
    '--status', metavar='NIMG', type=NIMG, default=None, help='Status line interval [default: 128Ki or preset].'
)
@click.option(
    '--snapshot', metavar='NIMG', type=NIMG, default=None, help='Network snapshot interval [default: 8Mi or preset].'
)
@click.option(
    '--checkpoint', metavar='NIMG', type=NIMG, default=None, help='Training-state interval [default: 128Mi or preset].'
)
@click.option(
    '--snapshot-fp32', 'snapshot_fp32', is_flag=True, help='Keep snapshot weights in float32 (default float16).'
)
@click.option(
    '--workers',
    metavar='INT',
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help='Data loader processes per device.',
)
@click.option('--seed', metavar='INT', type=int, default=0, show_default=True, help='Random seed.')
@click.option('-n', '--dry-run', is_flag=True, help='Print the resolved options and exit.')
def main(outdir: str, data: str | None, preset: str | None, dry_run: bool, **opts) -> None:
    """Train a diffusion model using the EDM2 recipe.

    Examples:

    \b
    # Demo on CPU with the built-in shapes data (12-13 minutes on 2 cores)
    python train_edm2.py --outdir=runs/demo --preset=demo

    \b
    # ImageNet-512 latents, XS model, 8 GPUs (re-run the same command to resume)
    torchrun --standalone --nproc_per_node=8 train_edm2.py \\
        --outdir=runs/img512-xs --data=datasets/img512-sd.zip --preset=edm2-img512-xs --batch-gpu=32
    """
    dist.init()
    try:
        c = setup_training_config(preset, data, **opts)
        dist.print0(json.dumps(c, indent=2))
        if dry_run:
            dist.print0('Dry run; exiting.')
            return
        if dist.get_rank() == 0:
            os.makedirs(outdir, exist_ok=True)
            with dnnlib.util.atomic_write(os.path.join(outdir, 'training_options.json'), 'wt') as f:
                json.dump(c, f, indent=2)
        dist.barrier()
        logger = dnnlib.util.Logger(os.path.join(outdir, 'log.txt'), file_mode='a') if dist.get_rank() == 0 else None
        try:
            training_loop(run_dir=outdir, **c)
        finally:
            if logger is not None:
                logger.close()
    except (dataset_mod.DatasetError, TrainingError, CheckpointError, OSError) as e:
        raise click.ClickException(one_line_message(e)) from e


if __name__ == '__main__':
    main()
