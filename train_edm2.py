"""Train magnitude-preserving diffusion models the EDM2 way (Karras et al., CVPR 2024)."""

import contextlib
import json
import os
import sys
import warnings

import click

import dnnlib
from torch_utils import distributed as dist
from training import faults
from training.backbones import ARCHS, FORMULATIONS
from training.checkpoint import CheckpointError
from training.click_types import FiniteFloatRange
from training.presets_train import TRAIN_PRESETS
from training.run_config import RunConfigError, check_dataset, check_run_folder, setup_training_run
from training.tracking import LOGGERS, Tracker
from training.training_loop import TrainingError, training_loop
from training.user_errors import USER_ERRORS, one_line

warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides')

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL of sysexits.h: stopped early, state saved, run again to resume.


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


@click.command(context_settings=dict(max_content_width=110))
@click.option(
    '--outdir', metavar='DIR', type=str, default=None, help='Run folder; a re-run resumes from its newest checkpoint.'
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
    '--patch',
    metavar='INT',
    type=click.IntRange(min=1),
    default=None,
    help='Transformer (dit, mp-dit) patch size [default: 2].',
)
@click.option(
    '--conv-mlp',
    'conv_mlp',
    metavar='BOOL',
    type=bool,
    default=None,
    help='MP-DiT: depthwise 3x3 convolution over the token grid inside each MLP [default: preset, else off].',
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
    '--dropout',
    metavar='FLOAT',
    type=FiniteFloatRange(0, 1),
    default=None,
    help='Dropout probability in blocks (unet, mp-dit).',
)
@click.option(
    '--label-dropout',
    'label_dropout',
    metavar='FLOAT',
    type=FiniteFloatRange(0, 1, max_open=True),
    default=None,
    help='Share of training images given the null label, so the net guides itself (--guidance without --gnet) '
    '[default: preset, else 0 for --formulation=edm and 0.1 for ddpm].',
)
@click.option(
    '--P_mean',
    'P_mean',
    metavar='FLOAT',
    type=FiniteFloatRange(),
    default=None,
    help='Mean of ln(sigma) in training (--formulation=edm).',
)
@click.option(
    '--P_std',
    'P_std',
    metavar='FLOAT',
    type=FiniteFloatRange(min=0, min_open=True),
    default=None,
    help='Std of ln(sigma) in training (--formulation=edm).',
)
@click.option(
    '--lr',
    metavar='FLOAT',
    type=FiniteFloatRange(min=0, min_open=True),
    default=None,
    help='Reference learning rate alpha_ref.',
)
@click.option(
    '--decay',
    metavar='BATCHES',
    type=FiniteFloatRange(min=0),
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
    '--fp16', metavar='BOOL', type=bool, default=None, help="EDM2's option: True is --precision=fp16, False fp32."
)
@click.option('--bf16', metavar='BOOL', type=bool, default=None, help='True is --precision=bf16.')
@click.option(
    '--precision',
    type=click.Choice(['fp32', 'fp16', 'bf16']),
    default=None,
    help='Compute precision; weights, EMA and loss stay fp32 [default: fp16 on CUDA, bf16 on bf16 CPUs, else fp32].',
)
@click.option('--tf32', is_flag=True, help='Allow TF32 matmuls and convolutions in fp32 on Ampere+ GPUs.')
@click.option('--compile', 'compile_net', is_flag=True, help='torch.compile the network (pays in long runs).')
@click.option('--checkpointing', is_flag=True, help='Activation checkpointing: recompute blocks in backward.')
@click.option(
    '--ls',
    metavar='FLOAT',
    type=FiniteFloatRange(min=0, min_open=True),
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
    '--keep-checkpoints',
    'keep_checkpoints',
    metavar='INT',
    type=click.IntRange(min=1),
    default=None,
    help='Keep only the newest INT training states [default: all].',
)
@click.option(
    '--requeue-exit-code',
    'requeue_exit_code',
    metavar='INT',
    type=click.IntRange(0, 255),
    default=REQUEUE_EXIT_CODE,
    show_default=True,
    help='Exit status after SIGTERM/SIGINT/SIGUSR1 saved the state (for requeue scripts).',
)
@click.option(
    '--continue-on-snapshot-error',
    'continue_on_snapshot_error',
    is_flag=True,
    help='Warn and train on when a snapshot or grid cannot be written (else save the state and stop).',
)
@click.option(
    '--max-bad-samples',
    'max_bad_samples',
    metavar='INT',
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help='Unreadable or wrongly sized images to skip (logged, counted as Data/skipped) before stopping.',
)
@click.option(
    '--snapshot-fp32', 'snapshot_fp32', is_flag=True, help='Keep snapshot weights in float32 (default float16).'
)
@click.option(
    '--snapshot-format',
    metavar='pkl|safetensors|both',
    type=click.Choice(['pkl', 'safetensors', 'both']),
    default='pkl',
    show_default=True,
    help='Snapshot files: pickles, .safetensors (load without running code) or both.',
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
@click.option(
    '--logger',
    'loggers',
    metavar='|'.join(LOGGERS),
    type=click.Choice(LOGGERS),
    multiple=True,
    help='Also send status scalars, sample grids and options to TensorBoard or W&B (repeatable)  [default: none]',
)
@click.option('-n', '--dry-run', is_flag=True, help='Print the resolved options and exit.')
def main(
    outdir: str | None,
    data: str | None,
    preset: str | None,
    dry_run: bool,
    loggers: tuple,
    requeue_exit_code: int,
    **opts,
) -> None:
    """Train a diffusion model using the EDM2 recipe.

    Examples:

    \b
    # Demo on CPU with the built-in shapes data (9-12 minutes on 2 idle cores), curves in TensorBoard
    python train_edm2.py --outdir=runs/demo --preset=demo --logger=tensorboard

    \b
    # ImageNet-512 latents, XS model, 8 GPUs (re-run the same command to resume)
    torchrun --standalone --nproc_per_node=8 train_edm2.py \\
        --outdir=runs/img512-xs --data=datasets/img512-sd.zip --preset=edm2-img512-xs --batch-gpu=32

    \b
    # The same, restarting all processes from the newest checkpoint when one dies (up to 3 times)
    torchrun --standalone --nproc_per_node=8 --max-restarts=3 train_edm2.py \\
        --outdir=runs/img512-xs --data=datasets/img512-sd.zip --preset=edm2-img512-xs --batch-gpu=32
    """
    dist.init()
    if outdir is None and not dry_run:
        raise click.ClickException('Missing option --outdir: the run folder (only --dry-run goes without one).')
    try:
        c, dataset = setup_training_run(preset, data, **opts)
        if dry_run:
            dist.print0(json.dumps(c, indent=2))
            dist.print0('Dry run; exiting.')
            return
        # Every check before the run folder is touched, so a failed start leaves nothing behind.
        tracker = Tracker(outdir, loggers if dist.get_rank() == 0 else [], config=c)
        resuming = check_run_folder(outdir, c)
        notes = []  # Warnings for the run's log, printed once it is open.
        with contextlib.ExitStack() as held:
            in_use = None
            if dist.get_rank() == 0:
                if not resuming:
                    notes = check_dataset(dataset, c.max_bad_samples)
                if c.snapshot_nimg and c.snapshot_nimg < 1000:
                    notes.append(
                        f'Note: --snapshot={c.snapshot_nimg} is under 1000 images, but snapshots are named by kimg '
                        f'(as EDM2 names them): those of one kimg replace each other.'
                    )
                os.makedirs(outdir, exist_ok=True)
                try:
                    held.enter_context(faults.lock_run(outdir))
                    with dnnlib.util.atomic_write(os.path.join(outdir, 'training_options.json'), 'wt') as f:
                        json.dump(c, f, indent=2)
                except TrainingError as e:
                    in_use = str(e)
            in_use = faults.first_error(in_use)  # Every rank stops with rank 0's line, none waits for it.
            if in_use is not None:
                raise TrainingError(in_use)
            logger = (
                dnnlib.util.Logger(os.path.join(outdir, 'log.txt'), file_mode='a') if dist.get_rank() == 0 else None
            )
            for line in notes:
                dist.print0(line)
            dist.print0(json.dumps(c, indent=2))
            try:
                stopped_early = training_loop(run_dir=outdir, tracker=tracker, dataset=dataset, **c)
                dist.finish()
            finally:
                tracker.close()
                if logger is not None:
                    logger.close()
        if stopped_early:
            sys.exit(requeue_exit_code)
    except (RunConfigError, TrainingError, CheckpointError, *USER_ERRORS) as e:
        raise click.ClickException(one_line(e)) from e


if __name__ == '__main__':
    main()
