"""Noise-aware CLIP guide (GLIDE, Nichol et al. 2021): model and contrastive loss.

The image tower is the encoder half of EDM2's U-Net (the same `build_encoder` / `run_encoder`) on the
EDM-preconditioned noisy image (c_in scales it, c_noise enters the embedding), pooled to one vector; the
text tower is an MP transformer (training/text.py) with its own weights. Both project into a shared space
of unit vectors, compared by cosine similarity times a learned temperature (CLIP, Radford et al. 2021).

Training uses the symmetric contrastive loss over the global batch: embeddings are gathered from all
ranks with their gradients. With `batch_gpu` set, gradient caching (GradCache, Gao et al. 2021, as
Diff-DALLE uses) keeps the whole per-rank batch in the loss while holding one chunk's activations.

Example:
    >>> net = CLIPGuide(img_resolution=16, img_channels=3)
    >>> img, txt, logit_scale = net(x, sigma, ['a red circle on a blue background, at the top'])
    >>> sim = (img * txt).sum(dim=1)    # cosine similarity in [-1, 1]
"""

import math

import torch

from torch_utils import distributed as dist
from torch_utils import misc, persistence, training_stats
from training.clip_eval import report_retrieval
from training.loss import P_MEAN, P_STD, TrainingLoss
from training.networks_edm2 import (
    SIGMA_DATA,
    MPConv,
    MPFourier,
    build_encoder,
    edm_coefficients,
    mp_silu,
    normalize,
    per_sample_sigma,
    run_encoder,
)
from training.text import ByteTokenizer, MPTextEncoder


@persistence.persistent_class
class ImageTower(torch.nn.Module):
    """EDM2's encoder (noise embedding and encoder blocks, as in the U-Net) on c_in·x, its last output
    average-pooled, pixel-normalised and projected to `embed_dim` by an MP linear layer."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        embed_dim: int,
        model_channels: int = 32,
        channel_mult: list[int] = [1, 2, 2],
        num_blocks: int = 1,
        attn_resolutions: list[int] = [8],
        sigma_data: float = SIGMA_DATA,
        **block_kwargs,
    ):
        super().__init__()
        self.sigma_data = sigma_data
        widths = [model_channels * m for m in channel_mult]
        self.emb_fourier = MPFourier(widths[0])
        self.emb_noise = MPConv(widths[0], max(widths), [])
        self.enc = build_encoder(
            img_resolution, img_channels + 1, widths, max(widths), num_blocks, attn_resolutions, **block_kwargs
        )
        self.out_linear = MPConv(widths[-1], embed_dim, [])

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        x = x.float()
        _, _, c_in, c_noise = edm_coefficients(per_sample_sigma(sigma, x), self.sigma_data)
        emb = mp_silu(self.emb_noise(self.emb_fourier(c_noise)))
        features = run_encoder(self.enc, torch.cat([c_in * x, torch.ones_like(x[:, :1])], dim=1), emb)[-1]
        return self.out_linear(normalize(features.mean(dim=[2, 3]), dim=1))


# CLIP's two towers, the shared space of unit vectors and the learned temperature.
@persistence.persistent_class
class CLIPGuide(torch.nn.Module):
    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        embed_dim: int = 128,
        text_length: int = 48,
        text_channels: int = 128,
        text_layers: int = 2,
        channels_per_head: int = 64,
        logit_scale_init: float = 1 / 0.07,
        logit_scale_max: float = 100,
        use_fp16: bool | str = False,
        **tower_kwargs,
    ):
        # use_fp16 is accepted for the training CLI's network options; the guide always computes in float32.
        # label_dim likewise: captions, not classes, condition the guide.
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, 0
        self.text_length, self.logit_scale_max = text_length, logit_scale_max
        self.image_tower = ImageTower(
            img_resolution, img_channels, embed_dim, channels_per_head=channels_per_head, **tower_kwargs
        )
        vocab_size = ByteTokenizer(text_length).vocab_size
        self.text_tower = MPTextEncoder(
            vocab_size, text_length, channels=text_channels, num_layers=text_layers, channels_per_head=channels_per_head
        )
        self.text_proj = MPConv(text_channels, embed_dim, [])
        # Logits are exp(t)·cosine similarity with t learned and exp(t) capped at logit_scale_max.
        self.logit_scale_log = torch.nn.Parameter(torch.tensor(math.log(logit_scale_init)))

    def encode_image(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings [N, embed_dim] of noisy images x at noise level sigma."""
        return torch.nn.functional.normalize(self.image_tower(x, sigma), dim=1)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Unit-norm embeddings [N, embed_dim] of captions."""
        tokens = ByteTokenizer(self.text_length)(list(captions)).to(self.logit_scale_log.device)
        pooled = self.text_tower(tokens)[1]
        return torch.nn.functional.normalize(self.text_proj(pooled), dim=1)

    def logit_scale(self) -> torch.Tensor:
        return self.logit_scale_log.float().exp().clamp(max=self.logit_scale_max)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, captions: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings, text embeddings, logit scale): everything the loss needs, in one DDP call."""
        return self.encode_image(x, sigma), self.encode_text(captions), self.logit_scale()


# ----------------------------------------------------------------------------
# Symmetric contrastive loss over the global batch (CLIP, Radford et al. 2021, Fig. 3).


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from all ranks in rank order; gradients flow back to each rank's own part."""
    if dist.get_world_size() == 1:
        return x
    return torch.cat(torch.distributed.nn.functional.all_gather(x), dim=0)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Per-sample loss of this rank's pairs: ½(image→text CE + text→image CE) over the global batch.

    Every rank holds the same number of pairs. The mean over all ranks' samples is the CLIP loss; the
    sum of each rank's local losses, through the gather's backward and DDP's gradient average, gives the
    gradient of the global mean scaled by the per-rank batch, as the training loop expects.
    """
    offset = dist.get_rank() * img.shape[0]
    logits = logit_scale * _gather(img) @ _gather(txt).T
    idx = torch.arange(offset, offset + img.shape[0], device=img.device)
    image_to_text = -logits[idx].log_softmax(dim=1)[torch.arange(len(idx)), idx]
    text_to_image = -logits[:, idx].log_softmax(dim=0)[idx, torch.arange(len(idx))]
    return (image_to_text + text_to_image) / 2


class _CachedEmbeddings(torch.autograd.Function):
    """GradCache (Gao et al. 2021): forward embeds the batch chunk by chunk without a graph; backward
    re-runs each chunk with grad and back-propagates the cached embedding gradients into the weights.
    Under DDP, only the last chunk's backward synchronises gradients."""

    @staticmethod
    def forward(ctx, anchor, net, x, sigma, captions, chunk):
        ctx.net, ctx.x, ctx.sigma, ctx.captions, ctx.chunk = net, x, sigma, captions, chunk
        outs = [net(x[i : i + chunk], sigma[i : i + chunk], captions[i : i + chunk]) for i in range(0, len(x), chunk)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[0][2]

    @staticmethod
    def backward(ctx, grad_img, grad_txt, grad_scale):
        starts = list(range(0, len(ctx.x), ctx.chunk))
        for k, i in enumerate(starts):
            s = slice(i, i + ctx.chunk)
            with torch.enable_grad(), misc.ddp_sync(ctx.net, sync=(k == len(starts) - 1)):
                img, txt, scale = ctx.net(ctx.x[s], ctx.sigma[s], ctx.captions[s])
                torch.autograd.backward([img, txt, scale], [grad_img[s], grad_txt[s], grad_scale / len(starts)])
        return (None,) * 6


# ----------------------------------------------------------------------------
# Training loss: images noised as for the denoiser, optional gradient caching, held-out retrieval.


@persistence.persistent_class
class CLIPLoss(TrainingLoss):
    """Contrastive loss of a CLIP guide on images noised as for the denoiser (ln σ ~ N(P_mean, P_std²)).

    batch_gpu: gradient-caching chunk of direct calls; in training, one data batch (--batch-gpu).
    eval_sigmas: noise levels of the held-out retrieval reported at each status line.
    """

    def __init__(
        self,
        P_mean: float = P_MEAN,
        P_std: float = P_STD,
        batch_gpu: int | None = None,
        eval_sigmas: list[float] = [0.02, 0.1, 0.5, 1, 2, 5, 20],
    ):
        super().__init__(P_mean=P_mean, P_std=P_std)
        self.batch_gpu = batch_gpu
        self.eval_sigmas = list(eval_sigmas)

    def __call__(
        self,
        net,
        images: torch.Tensor,
        labels: list[str],
        sigma: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """Per-sample contrastive losses; sigma and noise are drawn unless given; forward passes run in
        chunks of `chunk` (default batch_gpu) images with gradient caching."""
        captions = list(labels)
        sigma = self.sample_sigma(images) if sigma is None else sigma
        noise = torch.randn_like(images) if noise is None else noise
        x = images + noise * sigma
        chunk = chunk or self.batch_gpu or len(x)
        if chunk >= len(x):
            img, txt, logit_scale = net(x, sigma, captions)
        else:
            anchor = torch.zeros([], device=x.device, requires_grad=True)  # Gives the outputs a grad_fn.
            img, txt, logit_scale = _CachedEmbeddings.apply(anchor, net, x, sigma, captions, chunk)
        training_stats.report('CLIP/logit_scale', logit_scale.detach())
        return contrastive_loss(img, txt, logit_scale)

    def accumulate(self, net, batches, num_rounds: int, scale: float) -> None:
        """The whole per-rank share in one loss, since every pair of the global batch is compared; the
        forward passes run one data batch at a time (gradient caching) and synchronise once."""
        parts = [next(batches) for _ in range(num_rounds)]
        images = torch.cat([images for images, _captions in parts])
        captions = [caption for _images, batch_captions in parts for caption in batch_captions]
        loss = self(net, images, captions, chunk=len(parts[0][0]))
        training_stats.report('Loss/loss', loss)
        loss.sum().mul(scale).backward()

    def report(self, net: CLIPGuide, encoder, dataset_kwargs: dict, device: torch.device) -> None:
        """Image→text top-1 retrieval on the held-out split, per σ (training/clip_eval.py)."""
        report_retrieval(self, net, encoder, dataset_kwargs, device)

    def grid_conditioning(self, net, dataset, encoder, num: int, device: torch.device) -> None:
        """None: a guide makes no images, so no sample grids."""
        return None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith('_cache')}
