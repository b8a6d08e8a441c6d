"""An EDM2 network as a diffusers pipeline: `EDM2Denoiser` (a diffusers model holding the network) and
`EDM2Pipeline` (seeds in, images out), for folders written by training/diffusers_export.py.

The export copies this file into the folder twice, as pipeline.py (the custom pipeline) and as
denoiser/edm2_denoiser.py (the custom component), so that

    DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)

loads it. It is not standalone: the network classes, the sampler and the VAE normalisation are edm2x's own
(training/), so edm2x must be installed where the folder is loaded. Images then equal those of
generate_images.py for the same seeds and settings, since both call training.generation.sample(). The VAE is
diffusers' AutoencoderKL. No diffusers scheduler is used: none implements EDM's Heun sampler with churn
(Karras et al. 2022, Alg. 2) on EDM2's σ schedule, the sampler EDM2 nets are evaluated with.
"""

from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput

from training.generation import sample
from training.safetensors_io import build


class EDM2Denoiser(ModelMixin, ConfigMixin):
    """The denoiser D(x; σ, class_labels) of an edm2x network; `network` and `encoder` are the descriptions of
    training.safetensors_io.describe(), so the network is built from edm2x's allow-listed classes."""

    @register_to_config
    def __init__(self, network: dict, encoder: dict | None = None) -> None:
        super().__init__()
        self.net = build(network)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, sigma, class_labels)


class EDM2Pipeline(DiffusionPipeline):
    """Class-conditional or unconditional EDM2 sampling; `guide` is an optional guiding network (autoguidance or
    classifier-free guidance by an unconditional net, EDM2's D_g), `vae` the latent net's decoder."""

    _optional_components = ['vae', 'guide']

    def __init__(self, denoiser: ModelMixin, vae: ModelMixin | None, guide: ModelMixin | None) -> None:
        super().__init__()
        self.register_modules(denoiser=denoiser, vae=vae, guide=guide)

    @torch.no_grad()
    def __call__(
        self,
        seeds: Sequence[int] = range(4),
        class_labels: int | Sequence[int] | None = None,
        guidance: float = 1.0,
        num_inference_steps: int = 32,
        output_type: str = 'pil',
        **sampler_kwargs: Any,
    ) -> ImagePipelineOutput:
        """One image per seed, as generate_images.py --seeds makes them. class_labels: one class for all images,
        one per image, or None (a random class per seed). guidance: D_g + w·(D − D_g), needs `guide`.
        sampler_kwargs: edm_sampler's settings (sigma_min, sigma_max, rho, S_churn, solver, ...).
        output_type: 'pil' (PIL images), 'np' (uint8 NHWC array) or 'pt' (uint8 NCHW tensor)."""
        net = self.denoiser.net.eval()
        gnet = self.guide.net.eval() if self.guide is not None and guidance != 1 else None
        out = sample(
            net,
            list(seeds),
            class_labels,
            gnet=gnet,
            guidance=guidance,
            num_steps=num_inference_steps,
            **sampler_kwargs,
        )
        encoder = build(self.denoiser.config.encoder)
        if self.vae is not None:
            encoder._vae = self.vae  # The encoder's normalisation, with the pipeline's VAE as its decoder.
        images = encoder.decode(out.latents)
        if output_type == 'pt':
            return ImagePipelineOutput(images=images)
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == 'np':
            return ImagePipelineOutput(images=array)
        return ImagePipelineOutput(
            images=[PIL.Image.fromarray(np.squeeze(a, axis=2) if a.shape[2] == 1 else a) for a in array]
        )
