"""Convert network snapshots: to .safetensors files that load without running code, or to a diffusers folder."""

import os

import click

from training.diffusers_export import DiffusersExportError, export_diffusers
from training.dit_release import is_dit_checkpoint, load_dit_network
from training.output_paths import OutputPathError, check_output_file
from training.snapshots import (
    TRUST_HELP,
    NetworkPickleError,
    is_snapshot_name,
    load_network_pickle,
    save_network,
    trust_pickles,
)
from training.user_errors import plain_warnings

TRUST = click.option('--trust-pickles', is_flag=True, callback=trust_pickles, expose_value=False, help=TRUST_HELP)


@click.group()
def main() -> None:
    """Convert edm2x or NVIDIA EDM2 network pickles, and DiT checkpoints. Examples:

    \b
    # One pickle -> net.safetensors beside it (likewise a DiT .pt -> .safetensors)
    python export_network.py safetensors --net=run/net.pkl

    \b
    # Every snapshot of a run folder (post-hoc and classic EMAs, e.g. DiT's ema0.9999, included)
    python export_network.py safetensors --net=runs/demo

    \b
    # A latent net and its VAE as a diffusers pipeline folder
    python export_network.py diffusers --net=run/net.pkl --dest=out/edm2-diffusers
    """


def _sources(net: str) -> list[str]:
    if not os.path.isdir(net) or is_dit_checkpoint(net):
        return [net]
    found = [os.path.join(net, n) for n in sorted(os.listdir(net)) if is_snapshot_name(n) and n.endswith('.pkl')]
    if not found:
        raise click.ClickException(
            f'{net} holds no snapshot pickles named PREFIX-KIMG-STD.pkl or PREFIX-KIMG-emaBETA.pkl.'
        )
    return found


def _load(source: str) -> dict:
    """A snapshot dict: a pickle's, or a DiT checkpoint's (.pt, diffusers folder) as generate_images.py loads it."""
    if is_dit_checkpoint(source):
        net, encoder = load_dit_network(source)
        return dict(ema=net, encoder=encoder)
    return load_network_pickle(source)


@main.command()
@click.option(
    '--net', metavar='PKL|PT|DIR|URL', type=str, required=True, help='Network pickle, DiT checkpoint or run folder.'
)
@click.option(
    '--dest',
    metavar='PATH',
    type=str,
    default=None,
    help="Output file (one input)  [default: beside it; a URL's in the current folder]",
)
@TRUST
def safetensors(net: str, dest: str | None) -> None:
    """Write NAME.safetensors for each NAME.pkl (every snapshot of a run folder, classic EMAs included) or DiT
    checkpoint: weights and constructor configuration, loadable without code."""
    sources = _sources(net)
    if dest is not None and len(sources) > 1:
        raise click.ClickException(f'--dest names one file, but {net} holds {len(sources)} snapshots.')
    if dest is not None:
        try:
            check_output_file('--dest', dest, ('.safetensors',), [('--net', net)])
        except OutputPathError as e:
            raise click.ClickException(str(e)) from None
    for source in sources:
        name = os.path.basename(source) if '://' in source else os.path.normpath(source)
        target = dest or os.path.splitext(name)[0] + '.safetensors'
        try:
            save_network(_load(source), target, 'safetensors')
        except (NetworkPickleError, OSError) as e:  # OSError: a download that failed, among others
            raise click.ClickException(str(e)) from None
        click.echo(f'Wrote {target}')


@main.command()
@click.option(
    '--net', metavar='PKL|DIR|URL', type=str, required=True, help='Network pickle, .safetensors or run folder.'
)
@click.option('--dest', metavar='DIR', type=str, required=True, help='New (or empty) folder for the pipeline.')
@click.option('--gnet', metavar='PKL|DIR|URL', type=str, default=None, help='Guiding network (autoguidance / CFG).')
@click.option('--vae', metavar='ID|DIR', type=str, default=None, help="VAE to ship  [default: the net's own]")
@TRUST
def diffusers(net: str, dest: str, gnet: str | None, vae: str | None) -> None:
    """Write a folder that DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR, trust_remote_code=True) loads."""
    try:
        export_diffusers(net, dest, gnet=gnet, vae=vae)
    except (DiffusersExportError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f'Wrote {dest}')


if __name__ == '__main__':
    plain_warnings()
    main()
