"""Hand an EDM2 network to diffusers: a folder holding the network as a diffusers model, its VAE as diffusers'
AutoencoderKL and the custom pipeline of training/diffusers_pipeline.py, loadable with

    DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)

    folder/model_index.json        the pipeline's components
    folder/pipeline.py             EDM2Pipeline (a copy of training/diffusers_pipeline.py)
    folder/denoiser/               EDM2Denoiser: config.json (the network's description), weights, edm2_denoiser.py
    folder/guide/                  the guiding network, when one is given
    folder/vae/                    AutoencoderKL (latent nets only)
"""

import json
import os
import shutil

import diffusers

from training import diffusers_pipeline
from training.dataset_io import DatasetFileError, new_folder
from training.diffusers_pipeline import EDM2Denoiser
from training.encoders import StabilityVAEEncoder, StandardRGBEncoder, load_vae
from training.generation import guide_mismatch, network_kind
from training.network_loading import resolve_network_path
from training.safetensors_io import SafetensorsError, describe
from training.snapshots import NetworkPickleError, load_network_pickle
from training.vp_samplers import is_discrete

COMPONENT_MODULE = 'edm2_denoiser'


class DiffusersExportError(Exception):
    """A network that cannot be exported for diffusers; the message is one sentence for the user."""


def _denoiser(path: str) -> tuple[EDM2Denoiser, object]:
    """The network of a snapshot (pickle or .safetensors; a run folder's newest) as an EDM2Denoiser, and its
    encoder."""
    try:
        data = load_network_pickle(resolve_network_path(path))
    except NetworkPickleError as e:
        raise DiffusersExportError(str(e)) from None
    net, encoder = data['ema'], data.get('encoder') or StandardRGBEncoder()
    if network_kind(net) != 'edm2' or is_discrete(net):
        raise DiffusersExportError(
            f'{path} holds a {type(net).__name__}; only EDM2 class or unconditional nets export.'
        )
    if type(encoder).__name__ not in ('StandardRGBEncoder', 'StabilityVAEEncoder'):
        raise DiffusersExportError(f'{path} decodes with a {type(encoder).__name__}, which the pipeline cannot use.')
    try:
        (network, tensors), encoder_desc = describe(net), describe(encoder)[0]
    except SafetensorsError as e:
        raise DiffusersExportError(f'{path}: {e}') from None
    if tensors:
        raise DiffusersExportError(
            f'{path}: the network has tensor-valued constructor arguments; diffusers cannot store them.'
        )
    denoiser = EDM2Denoiser(network=network, encoder=encoder_desc)
    denoiser.net.load_state_dict(net.state_dict())
    return denoiser.eval(), encoder


def export_diffusers(net: str, dest: str, gnet: str | None = None, vae: str | None = None) -> None:
    """Write the network `net` (a snapshot path), with the guiding network `gnet` if given and its VAE (the
    encoder's, or `vae`: a hub id or folder), as a diffusers folder `dest` (see the module docstring)."""
    denoiser, encoder = _denoiser(net)
    guide = _denoiser(gnet)[0] if gnet is not None else None
    latent = isinstance(encoder, StabilityVAEEncoder) or type(encoder).__name__ == 'StabilityVAEEncoder'
    if vae is not None and not latent:
        raise DiffusersExportError(f'--vae={vae} applies to latent networks, but {net} makes pixels.')
    if guide is not None and (mismatch := guide_mismatch(guide.net, denoiser.net)):
        raise DiffusersExportError(mismatch)
    try:
        with new_folder(dest) as folder:  # dest appears complete or not at all
            _write(folder, denoiser, guide, latent, vae or getattr(encoder, 'vae_name', None))
    except DatasetFileError as e:
        raise DiffusersExportError(str(e)) from None


def _write(dest: str, denoiser: EDM2Denoiser, guide: EDM2Denoiser | None, latent: bool, vae: str | None) -> None:
    """The components, the pipeline's code and model_index.json into the (new, empty) folder `dest`."""
    source = diffusers_pipeline.__file__
    components = dict(denoiser=denoiser, guide=guide)
    index = {'_class_name': 'EDM2Pipeline', '_diffusers_version': diffusers.__version__}
    for name, model in components.items():
        index[name] = [COMPONENT_MODULE, 'EDM2Denoiser'] if model is not None else [None, None]
        if model is not None:
            model.save_pretrained(os.path.join(dest, name))
            shutil.copyfile(source, os.path.join(dest, name, f'{COMPONENT_MODULE}.py'))
    index['vae'] = ['diffusers', 'AutoencoderKL'] if latent else [None, None]
    if latent:
        load_vae(vae).save_pretrained(os.path.join(dest, 'vae'))
    shutil.copyfile(source, os.path.join(dest, 'pipeline.py'))
    with open(os.path.join(dest, 'model_index.json'), 'w') as f:
        json.dump(index, f, indent=2)
