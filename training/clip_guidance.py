"""CLIP-guided sampling with the noise-aware guide of clip_guide.py (GLIDE, Nichol et al. 2021, §2.4).

At every denoiser evaluation, the denoised estimate D(x; σ) (after CFG or autoguidance) becomes

    D + S · σ² · ∇ₓ sim(image_tower(x, σ), text(prompt)),     sim = cosine similarity.

Why σ²: the score is ∇ₓ log p(x; σ) = (D − x)/σ² (EDM, Karras et al. 2022, Eq. 3), so the term adds
S·∇ₓ sim to the score, i.e. classifier guidance with S·sim standing in for log p(prompt | x).
σ-dependence: the image tower reads c_in·x = x/sqrt(σ² + σ_d²), so ∇ₓ sim falls like 1/σ at high σ
and the shift of D grows about linearly with σ there: strong while the chain still chooses colours
and layout, and vanishing as σ → 0, so the final steps belong to the denoiser. Scale 0 adds nothing
(the sampler is not even handed a correction), so sampling stays bit-identical.

Gradients run through the guide's image tower only; the denoiser is evaluated without a graph.

Example:
    >>> clip = load_clip_guide('runs/demo-clip/network-snapshot-0000032-0.100.pkl', device)
    >>> correction = clip_correction(clip, ['a red circle on a blue background, at the center'] * 4, scale=0.5)
    >>> images = edm_sampler(net, noise, correction=correction)
"""

from typing import Callable

import torch

from training.snapshots import NetworkPickleError, load_network_pickle


def load_clip_guide(path: str, device: torch.device) -> torch.nn.Module:
    """The guide of a CLIP snapshot pickle, float32, eval mode, frozen, on `device`."""
    clip = load_network_pickle(path)['ema']
    if not all(hasattr(clip, k) for k in ('encode_image', 'encode_text')):
        raise NetworkPickleError(
            f'{path} holds a {type(clip).__name__}, not a CLIP guide; train one with --preset=demo-clip.'
        )
    return clip.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def check_clip_guide(clip: torch.nn.Module, net: torch.nn.Module) -> None:
    """The guide must read the images the denoiser makes."""
    shape = lambda m: (m.img_channels, m.img_resolution)
    if shape(clip) != shape(net):
        raise NetworkPickleError(
            f'The CLIP guide reads {clip.img_channels}x{clip.img_resolution}x{clip.img_resolution} '
            f'images but the network makes {net.img_channels}x{net.img_resolution}x{net.img_resolution}; '
            f'train the guide on the same data.'
        )


def clip_correction(clip: torch.nn.Module, captions: list[str], scale: float) -> Callable | None:
    """correction(x, sigma) = S·σ²·∇ₓ sim for edm_sampler (one caption per image), or None when S = 0."""
    if scale == 0:
        return None
    with torch.no_grad():
        txt = clip.encode_text(captions)

    def correction(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().to(torch.float32).requires_grad_(True)
            sim = (clip.encode_image(x, sigma) * txt).sum()  # Images are independent: each gets its own gradient.
            (grad,) = torch.autograd.grad(sim, x)
        return scale * torch.as_tensor(sigma, dtype=torch.float32) ** 2 * grad

    return correction
