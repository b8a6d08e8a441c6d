"""DiT's released models (Peebles & Xie 2023, arXiv 2212.09748) as networks that edm2x samples.

`DiT-XL-2-256x256.pt` and `DiT-XL-2-512x512.pt` are plain state dicts; the diffusers layout of the same models is
a folder with `transformer/` (a DiTTransformer2DModel), `scheduler/` (a DDPMScheduler) and often `vae/`. Either
becomes a `VPDenoiser` over `DiT` on its DDPM process (linear β over 1000 steps, ε-prediction, learned-range
variance), which training.generation.sample runs with DDPM or DDIM natively, or with the EDM sampler, and a
`DiTVAEEncoder` that decodes its latents (Stable Diffusion VAE latents times 0.18215).
"""

import json
import os
import zipfile

import numpy as np
import torch

from training.dit_checkpoints import DiTCheckpointError, load_dit_checkpoint
from training.encoders import DiTVAEEncoder
from training.networks_dit import DiT
from training.snapshots import NetworkPickleError
from training.vp_diffusion import VPDenoiser, VPDiffusion, VPDiffusionError, beta_schedule


def is_dit_checkpoint(path: str) -> bool:
    """A local DiT file saved by torch.save (a zip archive; pickles are edm2x networks) or a diffusers folder."""
    if os.path.isdir(path):
        return os.path.isdir(os.path.join(path, 'transformer'))
    return os.path.isfile(path) and zipfile.is_zipfile(path)


def dit_network(dit: DiT, diffusion: VPDiffusion | None = None) -> VPDenoiser:
    """A DiT on its DDPM process, by default DiT's own: linear β, T = 1000, learned-range variance when the net
    predicts it, else β_t as DiT's sampler uses without learned σ."""
    if diffusion is None:
        variance = 'learned_range' if dit.learn_sigma else 'fixed_large'
        diffusion = VPDiffusion.from_schedule('linear', 1000, variance=variance)
    return VPDenoiser(dit, diffusion, dit.input_size, dit.in_channels, dit.num_classes)


# A diffusers scheduler's settings as a VPDiffusion. The net's output decides a learned variance (DDIMScheduler
# configs name none); diffusers' '*_log' variances are the same variances.
def diffusion_from_scheduler_config(config: dict, learn_sigma: bool = True) -> VPDiffusion:
    T = int(config.get('num_train_timesteps', 1000))
    lo, hi = float(config.get('beta_start', 1e-4)), float(config.get('beta_end', 0.02))
    schedules = {
        'linear': lambda: np.linspace(lo, hi, T, dtype=np.float64),
        'scaled_linear': lambda: np.linspace(lo**0.5, hi**0.5, T, dtype=np.float64) ** 2,
        'squaredcos_cap_v2': lambda: beta_schedule('cosine', T),
    }
    name = config.get('beta_schedule', 'linear')
    prediction = {'epsilon': 'eps', 'v_prediction': 'v'}.get(config.get('prediction_type', 'epsilon'))
    variance = str(config.get('variance_type', 'fixed_large')).removesuffix('_log')
    variance = 'learned_range' if learn_sigma else variance if variance.startswith('fixed') else 'fixed_large'
    if name not in schedules or prediction is None:
        raise VPDiffusionError(
            f'unsupported scheduler settings beta_schedule={name!r}, {config.get("prediction_type")}'
        )
    return VPDiffusion(schedules[name](), prediction=prediction, variance=variance)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise NetworkPickleError(f'Cannot read {path} ({e}); the diffusers DiT folder is incomplete.') from None


def _load_diffusers_folder(folder: str) -> tuple[DiT, VPDiffusion, str | None]:
    transformer = os.path.join(folder, 'transformer')
    config = _read_json(os.path.join(transformer, 'config.json'))
    files = [os.path.join(transformer, f'diffusion_pytorch_model.{ext}') for ext in ('safetensors', 'bin')]
    weights = next((f for f in files if os.path.isfile(f)), None)
    if weights is None:
        raise NetworkPickleError(f'{transformer} holds no diffusion_pytorch_model.safetensors or .bin weights.')
    if weights.endswith('.safetensors'):
        import safetensors.torch  # Installed with diffusers.

        state = safetensors.torch.load_file(weights)
    else:
        state = torch.load(weights, map_location='cpu', weights_only=True)
    overrides = {'num_heads': config['num_attention_heads']} if 'num_attention_heads' in config else {}
    dit = load_dit_checkpoint(state, input_size=config.get('sample_size'), **overrides)
    scheduler = os.path.join(folder, 'scheduler', 'scheduler_config.json')
    diffusion = None
    if os.path.isfile(scheduler):
        diffusion = diffusion_from_scheduler_config(_read_json(scheduler), dit.learn_sigma)
    vae = os.path.join(folder, 'vae')
    return dit, diffusion, vae if os.path.isdir(vae) else None


def load_dit_network(path: str) -> tuple[VPDenoiser, DiTVAEEncoder]:
    """(net, encoder) of a local DiT state dict file or diffusers folder. The encoder decodes with the folder's
    own vae/, else with DiTVAEEncoder's default (sd-vae-ft-ema). Problems raise NetworkPickleError with one sentence."""
    try:
        if os.path.isdir(path):
            dit, diffusion, vae = _load_diffusers_folder(path)
        else:
            dit, diffusion, vae = load_dit_checkpoint(path), None, None
        net = dit_network(dit, diffusion)
    except DiTCheckpointError as e:
        if str(e).startswith('Not a DiT checkpoint'):
            raise NetworkPickleError(f'{path} is neither an edm2x network pickle nor a DiT checkpoint: {e}') from None
        raise NetworkPickleError(str(e) if path in str(e) else f'{path}: {e}') from None
    except VPDiffusionError as e:
        raise NetworkPickleError(f'{path}: {e}.') from None
    return net, DiTVAEEncoder(vae) if vae else DiTVAEEncoder()
