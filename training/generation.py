"""Generating images: loading networks, one sampling entry point for every kind of network, per-seed batches.

`sample()` is the one place that decides how a network is sampled: class-conditional or unconditional
EDM2 nets, text-to-image nets (captions, classifier-free guidance by the empty caption), super-resolution
stages (a low-res input, optionally noise-augmented as in Imagen, Saharia et al. 2022, §2.4), discrete-time
DDPM nets and DiT's released models (VPDenoiser; guidance by the null label as DiT applies it) and
optional CLIP guidance (GLIDE, Nichol et al. 2021), with the EDM sampler, DDPM or DDIM for every net. The
training loop's sample grids, generate_images.py, calculate_metrics.py gen and bench/ all call it.

Every image depends only on its seed and the settings, never on the batch or the number of ranks: its
noise, random class and churn noise come from its own generator (StackedRandomGenerator).
"""

import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils.host_memory import keep_freed_memory
from training.clip_guidance import check_clip_guide, clip_correction, load_clip_guide
from training.encoders import StandardRGBEncoder
from training.network_loading import load_network, resolve_network_path
from training.precision import prepare_for_sampling
from training.sampling import StackedRandomGenerator, edm_sampler
from training.vp_diffusion import VPDiffusion, VPDiffusionError
from training.vp_samplers import ddim_sampler, ddpm_sampler, guided_model, is_discrete, vp_model


class GenerationError(Exception):
    """Settings that cannot generate images; the message is one sentence for the user."""


# ----------------------------------------------------------------------------
# CLIP guides.


def load_clip(
    clip: torch.nn.Module | str | None,
    clip_scale: float,
    nets: list[torch.nn.Module],
    prompts: list[str] | None,
    device: torch.device,
    verbose: bool = False,
) -> torch.nn.Module | None:
    """The CLIP guide when CLIP guidance is on (scale != 0), checked to read the images of one of `nets`."""
    if clip is None or clip_scale == 0:
        return None
    if not prompts:
        raise GenerationError('CLIP guidance needs prompts: give --prompt="..." or --prompts=FILE.')
    if isinstance(clip, str):
        path = resolve_network_path(clip)
        if verbose:
            dist.print0(f'Loading CLIP guide from {path} ...')
        clip = load_clip_guide(path, device)
    check_clip_guide(clip, next((net for net in nets if _shape(net) == _shape(clip)), nets[-1]))
    return clip


def _shape(net: torch.nn.Module) -> str:
    return f'{net.img_channels}x{net.img_resolution}x{net.img_resolution}'


def guide_mismatch(gnet: torch.nn.Module, net: torch.nn.Module) -> str | None:
    """Why `gnet` cannot guide `net` (None when it can): it must make the network's images and read its classes
    or none (an unconditional guide)."""
    if _shape(gnet) == _shape(net) and gnet.label_dim in (0, net.label_dim):
        return None
    return (
        f'The guiding network makes {_shape(gnet)} images with {gnet.label_dim} classes, but the network makes '
        f'{_shape(net)} with {net.label_dim}; guide it with a net trained on the same data.'
    )


# ----------------------------------------------------------------------------
# The sampling entry point.


SAMPLERS = ('edm', 'ddpm', 'ddim')


# The EDM sampler's settings (edm_sampler's), which DDPM and DDIM do not read.
EDM_SAMPLER_SETTINGS = (
    'sigma_min',
    'sigma_max',
    'rho',
    'S_churn',
    'S_min',
    'S_max',
    'S_noise',
    'solver',
    'schedule',
    'guidance_interval',
)


def unread_settings(settings: dict[str, Any], discrete: bool = False) -> dict[str, str]:
    """The sampler settings that sample() does not read under `settings`, each with the condition under which it
    would, worded to follow 'applies': the other sampler's settings, ρ without Karras' schedule, churn's range and
    noise without churn, the step count beside a respacing, and the β schedule of a `discrete` (DDPM) net."""
    sampler = settings.get('sampler', 'edm')
    if sampler == 'edm':
        unread = dict.fromkeys(('respacing', 'vp_schedule'), 'to --sampler=ddpm and ddim only, not to --sampler=edm')
        unread['eta'] = 'to --sampler=ddim only, not to --sampler=edm'
        schedule = settings.get('schedule', 'karras')
        if schedule != 'karras':
            unread['rho'] = f'to --schedule=karras only, not to --schedule={schedule}'
        if not settings.get('S_churn', 0) > 0:
            unread.update(dict.fromkeys(('S_min', 'S_max', 'S_noise'), 'with churn only (--S_churn > 0)'))
        return unread
    unread = dict.fromkeys(EDM_SAMPLER_SETTINGS, f'to --sampler=edm only, not to --sampler={sampler}')
    if sampler == 'ddpm':
        unread['eta'] = 'to --sampler=ddim only, not to --sampler=ddpm'
    if settings.get('respacing') is not None:
        unread['num_steps'] = 'without --respacing only, which sets the ddpm/ddim steps itself'
    if discrete:
        unread['vp_schedule'] = 'to EDM nets only; a DDPM net samples on its own β schedule'
    return unread


KIND_NAMES = {
    'guide': 'a CLIP guide',
    'sr': 'a super-resolution stage',
    'text': 'text-to-image',
    'edm2': 'class-conditional or unconditional',
}


def network_kind(net: torch.nn.Module) -> str:
    """'guide' (a CLIP guide, no denoiser), 'sr' (super-resolution stage), 'text' (text-to-image) or 'edm2'."""
    if hasattr(net, 'encode_image'):
        return 'guide'
    if hasattr(net, 'text_encoder'):  # training/networks_text.py: captions as labels, maybe a low-res input
        return 'sr' if getattr(net, 'lowres', None) else 'text'
    return 'edm2'


def guides_itself(net: torch.nn.Module) -> bool:
    """Whether a class net guides itself by the all-zero null label: DiT-style discrete nets, and EDM nets
    trained with label dropout."""
    return bool(net.label_dim) and (is_discrete(net) or getattr(net, 'label_dropout', 0) > 0)


def check_samplable(net: torch.nn.Module, has_lowres: bool, guidance: float, gnet: Any) -> str:
    """The network's kind, or a GenerationError when sample() cannot run it with these inputs."""
    kind = network_kind(net)
    if kind == 'guide':
        raise GenerationError('The network is a CLIP guide, not a denoiser; give it with --clip.')
    if kind == 'sr' and not has_lowres:
        raise GenerationError(
            f'The network is a {net.lowres}->{net.img_resolution} super-resolution stage; '
            f'run it after a base net with --cascade.'
        )
    if guidance != 1 and gnet is None and kind == 'edm2' and not guides_itself(net):
        raise GenerationError(
            f'Guidance {guidance} needs a guiding network (--gnet): this net was not trained with label dropout.'
        )
    return kind


def _with_conditioning(net: Callable, captions: list[str], **kwargs: Any) -> Callable:
    """net as edm_sampler's denoiser D(x, σ, labels), with captions and low-res inputs fixed."""
    return lambda x, sigma, labels=None: net(x, sigma, captions, **kwargs)


def sample(
    net: torch.nn.Module,
    seeds: Sequence[int] | StackedRandomGenerator,
    class_idx: int | Sequence[int] | None = None,
    captions: list[str] | None = None,
    lowres: torch.Tensor | None = None,
    aug_sigma: float = 0.0,
    gnet: torch.nn.Module | None = None,
    guidance: float = 1.0,
    clip: torch.nn.Module | None = None,
    clip_scale: float = 0.0,
    sampler: str = 'edm',
    respacing: str | None = None,
    eta: float = 0.0,
    vp_schedule: str = 'linear',
    **sampler_kwargs: Any,
) -> dnnlib.EasyDict:
    """Sample one image per seed; returns EasyDict(latents, labels) in network space.

    seeds: the images' seeds, or a StackedRandomGenerator to continue (a cascade's later stages).
    class_idx: class of every image, or one per image, or None (a random class per seed); ignored by
        nets without classes. `labels` is the one-hot [N, label_dim] used, or None.
    captions: text nets' prompts, one per image (None: the empty caption).
    lowres, aug_sigma: a super-resolution stage's low-res input and its noise augmentation.
    gnet, guidance: D = D_g + w·(D − D_g); a text net without gnet is guided by the empty caption, a
        class net trained with label dropout (DiT, `Precond(label_dropout=...)`) by the null label.
    clip, clip_scale: CLIP guidance towards `captions`, for nets whose images the guide reads (EDM sampler).
    sampler: 'edm' (EDM's Heun, Karras et al. 2022 Alg. 2), 'ddpm' (ancestral, Ho et al. 2020 Alg. 2) or 'ddim'
        (Song et al. 2021, noise `eta`), for every net; see _sample_vp for the DDPM view of an EDM net.
    respacing, vp_schedule: ddpm/ddim steps in improved DDPM's notation ('250', 'ddim25', '10,15,20'; default:
        num_steps evenly spaced) and the β schedule on which an EDM net runs them.
    sampler_kwargs: edm_sampler's settings (num_steps, sigma_min, S_churn, solver, schedule, guidance_interval,
        ...); a discrete net's own σ range
        is the EDM sampler's default.
    """
    kind = check_samplable(net, lowres is not None, guidance, gnet)
    if sampler not in SAMPLERS:
        raise GenerationError(f'Unknown sampler {sampler!r}; choose one of: {", ".join(SAMPLERS)}.')
    device = _device_of(net)
    rnd = seeds if isinstance(seeds, StackedRandomGenerator) else StackedRandomGenerator(device, seeds)
    n = len(rnd.generators)

    # Per image: its noise, then (without a given class) its random class, then augmentation and churn noise.
    noise = rnd.randn([n, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = None
    if net.label_dim:
        if class_idx is None:
            idx = rnd.randint(net.label_dim, size=[n], device=device)
        else:
            idx = torch.as_tensor(class_idx, device=device).expand(n)
        labels = torch.eye(net.label_dim, device=device)[idx]
    if clip is not None and clip_scale != 0 and _shape(clip) == _shape(net):
        if captions is None:
            raise GenerationError('CLIP guidance needs prompts: give --prompt="..." or --prompts=FILE.')
        sampler_kwargs['correction'] = clip_correction(clip, captions, clip_scale)
    sampler_kwargs['randn_like'] = rnd.randn_like
    if sampler != 'edm' and 'correction' in sampler_kwargs:
        raise GenerationError(f'CLIP guidance runs with the EDM sampler; drop --sampler={sampler}.')

    # The net and its guide, each a (denoiser D(x, σ, labels), labels) pair.
    cond, uncond = (net, labels), None
    if kind in ('text', 'sr'):
        captions = [''] * n if captions is None else list(captions)
        inputs = {}
        if kind == 'sr':
            inputs = dict(lowres=lowres, aug_sigma=aug_sigma)
            if aug_sigma > 0:  # Corrupt the input as in training; the noise comes from each image's own stream.
                inputs['lowres'] = lowres + aug_sigma * rnd.randn_like(lowres)
        cond = (_with_conditioning(net, captions, **inputs), None)
        if guidance != 1 and gnet is not None:  # The guiding net reads the same captions and low-res input.
            uncond = (_with_conditioning(gnet, captions, **inputs), None)
        elif guidance != 1:  # Classifier-free guidance: the same net given the empty caption.
            uncond = (_with_conditioning(net, [''] * n, **inputs), None)
    elif guidance != 1:  # A guiding net, or the class net's own null label (an all-zero one-hot row).
        uncond = (gnet, labels) if gnet is not None else (net, torch.zeros_like(labels))

    if sampler != 'edm':
        latents = _sample_vp(net, cond, uncond, noise, guidance, sampler, respacing, eta, vp_schedule, **sampler_kwargs)
        return dnnlib.EasyDict(latents=latents, labels=labels)
    if is_discrete(net):
        sampler_kwargs = {'sigma_min': net.sigma_min, 'sigma_max': net.sigma_max, **sampler_kwargs}
    guide = None if uncond is None else _fixed_labels(*uncond)
    latents = edm_sampler(_fixed_labels(*cond), noise, labels, guide, guidance=guidance, **sampler_kwargs)
    return dnnlib.EasyDict(latents=latents, labels=labels)


def _fixed_labels(denoiser: Callable, labels: torch.Tensor | None) -> Callable:
    return lambda x, sigma, _labels=None: denoiser(x, sigma, labels)


def vp_process(
    net: torch.nn.Module, respacing: str | None = None, vp_schedule: str = 'linear', num_steps: int = 32
) -> tuple[VPDiffusion, VPDiffusion]:
    """The VP process a net runs ddpm/ddim on (a discrete net's own, else `vp_schedule`'s) and its respaced steps."""
    try:
        diffusion = net.diffusion if is_discrete(net) else VPDiffusion.from_schedule(vp_schedule)
        return diffusion, diffusion.respace(str(num_steps) if respacing is None else respacing)
    except VPDiffusionError as e:
        raise GenerationError(f'{e}.') from None


def _sample_vp(
    net: torch.nn.Module,
    cond: tuple,
    uncond: tuple | None,
    noise: torch.Tensor,
    guidance: float,
    sampler: str,
    respacing: str | None,
    eta: float,
    vp_schedule: str,
    num_steps: int = 32,
    randn_like: Callable = torch.randn_like,
    **edm_only: Any,
) -> torch.Tensor:
    """DDPM or DDIM from unit noise x_T. A discrete net steps on its own (respaced) process. An EDM net steps on
    a VP process with the β `vp_schedule` (T = 1000, fixed variance β̃_t): its D(x; σ_t) at each kept step's
    σ_t = √((1 − ᾱ_t)/ᾱ_t) gives ε̂ = (x − D)/σ_t with x = x_t/√ᾱ_t. Guidance mixes ε's (equal to mixing D's, as
    both share x); DiT nets guide 3 of their 4 ε channels, as DiT's sampler does. EDM-only settings are unused."""
    diffusion, steps = vp_process(net, respacing, vp_schedule, num_steps)
    model = vp_model(*cond, diffusion)
    if uncond is not None:
        dit = type(getattr(net, 'net', None)).__name__ == 'DiT' and net.img_channels == 4
        model = guided_model(model, vp_model(*uncond, diffusion), guidance, 3 if dit else net.img_channels)
    if sampler == 'ddpm':
        return ddpm_sampler(model, noise, steps, randn_like=randn_like)
    return ddim_sampler(model, noise, steps, eta=eta, randn_like=randn_like)


def _device_of(net: torch.nn.Module) -> torch.device:
    return next(iter(net.parameters()), torch.empty([])).device


# ----------------------------------------------------------------------------
# Per-seed batches split over torchrun ranks.


def distinct_seeds(seeds: Iterable[int]) -> list[int]:
    """The seeds as a list; GenerationError when one comes twice, since each seed names one image (its file, its
    row of an .npz, its caption)."""
    seeds, seen = list(seeds), set()
    for seed in seeds:
        if seed in seen:
            raise GenerationError(
                f'seed {seed} comes twice, but each seed names one image ({seed:06d}.png, one row of --npz); give '
                f'each seed once (to compare prompts at one seed, run once per prompt).'
            )
        seen.add(seed)
    return seeds


def rank_batches(
    seeds: Iterable[int], prompts: list[str] | None, max_batch_size: int, verbose: bool = False
) -> Iterator[tuple[list[int], list[str] | None]]:
    """This rank's batches of (seeds, captions); image i of the run gets prompts[i % len(prompts)].

    Batches interleave over ranks (global step k runs batches k·world ... k·world + world − 1), so all
    ranks take the same number of steps; a progress bar on rank 0 counts every rank's images.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    seeds = np.asarray(list(seeds), dtype=np.int64)
    num_steps = max(math.ceil(len(seeds) / (max_batch_size * world)), 1)
    parts = np.array_split(np.arange(len(seeds)), num_steps * world)
    with dnnlib.util.progress_bar(total=len(seeds), unit='img', disable=not verbose or rank != 0) as progress:
        for step in range(num_steps):
            mine = parts[step * world + rank]
            if len(mine):
                yield seeds[mine].tolist(), [prompts[i % len(prompts)] for i in mine] if prompts else None
            progress.update(sum(len(p) for p in parts[step * world : (step + 1) * world]))


def _as_device(device: torch.device | str | None) -> torch.device:
    """The device to sample on (default: this rank's); on the CPU, freed host memory is kept for the next batch."""
    device = torch.device(device) if device is not None else dist.device()
    keep_freed_memory(device)
    return device


def generate_images(
    net: torch.nn.Module | str,
    encoder: Any = None,
    gnet: torch.nn.Module | str | None = None,
    seeds: Iterable[int] = range(16),
    class_idx: int | None = None,
    max_batch_size: int = 32,
    device: torch.device | str | None = None,
    verbose: bool = False,
    prompts: list[str] | None = None,
    clip: torch.nn.Module | str | None = None,
    clip_scale: float = 0.0,
    vae: str | None = None,
    precision: str | None = None,
    compile: bool = False,
    **sampler_kwargs: Any,
) -> Iterator[dnnlib.EasyDict]:
    """Sample this rank's share of `seeds`, yielding per batch EasyDict(images, seeds, labels, captions).

    `images` are uint8 NCHW on `device`, `labels` one-hot [N, label_dim] (None for unconditional nets).
    `net` and `gnet` may be modules or pickle paths, URLs or run folders; the guiding net is neither
    loaded nor evaluated when guidance is 1. `sampler_kwargs` go to sample() (guidance, num_steps, ...).
    Text-to-image nets take `prompts` (image i gets prompts[i % len(prompts)], yielded as `captions`).
    `clip` (a CLIP guide or its pickle) with `clip_scale` != 0 steers any net towards the prompts.
    `vae` replaces the VAE of a loaded latent net's encoder (load_network). `precision` ('fp32', 'fp16',
    'bf16'; None: as pickled) and `compile` apply to `net` and `gnet` in place (precision.prepare_for_sampling).
    """
    seeds = distinct_seeds(seeds)
    device = _as_device(device)
    if isinstance(net, str):
        with dist.rank0_first():  # one download into the cache, not one per rank
            net, pickled_encoder = load_network(net, device, verbose, vae=vae)
        encoder = encoder or pickled_encoder
    encoder = encoder or StandardRGBEncoder()
    kind = check_samplable(net, False, sampler_kwargs.get('guidance', 1), gnet)
    unread = unread_settings(sampler_kwargs, is_discrete(net))
    if sampler_kwargs.get('vp_schedule') is not None and 'vp_schedule' in unread:
        raise GenerationError(f'--vp-schedule applies {unread["vp_schedule"]}.')
    if sampler_kwargs.get('sampler', 'edm') != 'edm':  # Bad respacing fails here, before the VAE loads.
        vp_process(net, **{k: v for k, v in sampler_kwargs.items() if k in ('respacing', 'vp_schedule', 'num_steps')})
    if sampler_kwargs.get('guidance', 1) == 1:
        gnet = None
    elif isinstance(gnet, str):
        with dist.rank0_first():
            gnet = load_network(gnet, device, verbose)[0]
    if gnet is not None and network_kind(gnet) != kind:
        raise GenerationError(
            f'The guiding network is {KIND_NAMES[network_kind(gnet)]}, but the network is {KIND_NAMES[kind]}; '
            f'guide it with a net of its kind.'
        )
    if gnet is not None and (mismatch := guide_mismatch(gnet, net)):
        raise GenerationError(mismatch)
    if class_idx is not None and not 0 <= class_idx < net.label_dim:
        labels_range = f'has classes 0 to {net.label_dim - 1}' if net.label_dim else 'is unconditional'
        raise GenerationError(f'Class {class_idx} was requested, but the network {labels_range}.')
    if kind == 'text' and not prompts:
        raise GenerationError('The network is text-to-image: give --prompt="..." or --prompts=FILE.')
    if prompts and kind != 'text' and clip is None:
        raise GenerationError(
            f'The network is {KIND_NAMES[kind]} and reads no text: drop the prompts, or steer it towards them '
            f'with a CLIP guide (generate_images.py --clip).'
        )
    for denoiser in (net, gnet):
        if denoiser is not None:
            prepare_for_sampling(denoiser, precision, compile)
    clip = load_clip(clip, clip_scale, [net], prompts, device, verbose)
    encoder.init(device)
    with_captions = kind in ('text', 'sr') or clip is not None
    for batch_seeds, captions in rank_batches(seeds, prompts if with_captions else None, max_batch_size, verbose):
        with torch.no_grad():
            out = sample(
                net, batch_seeds, class_idx, captions, gnet=gnet, clip=clip, clip_scale=clip_scale, **sampler_kwargs
            )
            images = encoder.decode(out.latents)
        yield dnnlib.EasyDict(images=images, seeds=batch_seeds, labels=out.labels, captions=captions)


def generate_cascade(
    stages: list[dnnlib.EasyDict],
    prompts: list[str],
    seeds: Iterable[int] = range(16),
    max_batch_size: int = 32,
    device: torch.device | str | None = None,
    verbose: bool = False,
    guidance: float | None = None,
    aug_sigma: float | None = None,
    clip: torch.nn.Module | str | None = None,
    clip_scale: float = 0.0,
    precision: str | None = None,
    compile: bool = False,
    **sampler_kwargs: Any,
) -> Iterator[dnnlib.EasyDict]:
    """Run a text-to-image net and its super-resolution stages in order (Imagen's cascade), yielding per
    batch EasyDict(images, seeds, labels=None, captions) at the last stage's resolution.

    A stage is EasyDict(net, num_steps, guidance, aug_sigma) as in presets_generate.cascades; `guidance`
    overrides the first stage's, `aug_sigma` the super-resolution stages'. `sampler_kwargs` are EDM sampler
    settings for every stage (solver, schedule, guidance_interval, ...; num_steps replaces each stage's own).
    Pixel-space stages only. `precision` and `compile` apply to every stage (precision.prepare_for_sampling).
    CLIP guidance applies to the stages whose images the guide reads. Each image's stages draw from one
    generator in order, so an image still depends on its seed alone.
    """
    seeds = distinct_seeds(seeds)
    device = _as_device(device)
    with dist.rank0_first():
        loaded = [load_network(stage.net, device, verbose) for stage in stages]
    nets = [net for net, _encoder in loaded]
    for k, net in enumerate(nets):
        want = 'sr' if k else 'text'
        if network_kind(net) != want or (k and net.lowres != nets[k - 1].img_resolution):
            role = f'a {nets[k - 1].img_resolution}->N super-resolution stage' if k else 'a text-to-image base net'
            raise GenerationError(f'Cascade stage {k + 1} ({stages[k].net}) must be {role}.')
        prepare_for_sampling(net, precision, compile)
    stage_kwargs = [{'num_steps': stage.num_steps, **sampler_kwargs} for stage in stages]
    clip = load_clip(clip, clip_scale, nets, prompts, device, verbose)
    encoder = loaded[-1][1] or StandardRGBEncoder()
    encoder.init(device)
    for batch_seeds, captions in rank_batches(seeds, prompts, max_batch_size, verbose):
        rnd = StackedRandomGenerator(device, batch_seeds)
        x = None
        with torch.no_grad():
            for k, (net, stage, kw) in enumerate(zip(nets, stages, stage_kwargs)):
                x = sample(
                    net,
                    rnd,
                    captions=captions,
                    lowres=None if x is None else x.clamp(-1, 1),
                    aug_sigma=stage.aug_sigma if aug_sigma is None else aug_sigma,
                    guidance=stage.guidance if guidance is None or k else guidance,
                    clip=clip,
                    clip_scale=clip_scale,
                    **kw,
                ).latents
            images = encoder.decode(x)
        yield dnnlib.EasyDict(images=images, seeds=batch_seeds, labels=None, captions=captions)
