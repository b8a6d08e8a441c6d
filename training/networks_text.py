"""Text-conditioned and super-resolution EDM2 nets (SPEC §8): cross-attention, pooled text, low-res input.

The U-Net is EDM2's (training/networks_edm2.py) with three additions, each off unless asked for:
cross-attention after every self-attention block (queries from the image, keys and values from the
text encoder's token features), the pooled caption feature joined to the embedding like the class
label, and for super-resolution a low-resolution image, upsampled and concatenated to the input, whose
noise-augmentation level enters the embedding like the noise level (Imagen, Saharia et al. 2022).
With `residual=True` a super-resolution stage denoises the image minus that upsampled input, the
detail bicubic interpolation misses (as SR3's and ResShift's residual formulations do); `sigma_data`
is then the std of that residual, and an untrained net already returns the bicubic image.

The captions' encoder is trained with the net (MPTextEncoder) unless `text_encoder_path` names a local
Hugging Face model to use frozen (FrozenTextEncoder), whose weights stay outside the net's pickles.
`class_labels` of `TextPrecond` are captions: a list of strings, or token ids [N, text_length]; None
or '' is the empty caption, which gives the unconditional prediction (caption dropout in training).
"""

import torch

from torch_utils import persistence
from training.networks_edm2 import MPConv, MPFourier, Precond, UNet, mp_cat, mp_silu, mp_sum
from training.text import FrozenTextEncoder, MPTextEncoder, make_tokenizer, mp_attention

# ----------------------------------------------------------------------------
# Cross-attention from image pixels to caption tokens.


# MP cross-attention: q from a 1x1 MP conv of x, k and v from the token features, each
# pixel-normalised per head as in EDM2's self-attention; joined to x by MP-sum (Eq. 88).
@persistence.persistent_class
class CrossAttention(torch.nn.Module):
    def __init__(self, channels: int, text_channels: int, channels_per_head: int = 64, balance: float = 0.3):
        super().__init__()
        self.num_heads = max(channels // channels_per_head, 1)
        self.balance = balance
        self.q = MPConv(channels, channels, kernel=[1, 1])
        self.kv = MPConv(text_channels, channels * 2, kernel=[])
        self.proj = MPConv(channels, channels, kernel=[1, 1])

    def forward(self, x: torch.Tensor, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.q(x).flatten(2).mT
        k, v = self.kv(features.to(x.dtype)).chunk(2, dim=2)
        y = mp_attention(q, k, v, self.num_heads, mask).mT.reshape(x.shape)
        return mp_sum(x, self.proj(y), t=self.balance)


# ----------------------------------------------------------------------------
# U-Net with text and low-resolution conditioning.


@persistence.persistent_class
class TextUNet(UNet):
    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        text_channels: int = 0,
        cond_channels: int = 0,
        augment_embedding: bool = False,
        channels_per_head: int = 64,
        cross_balance: float = 0.3,
        **unet_kwargs,
    ):
        super().__init__(
            img_resolution=img_resolution,
            img_channels=img_channels,
            label_dim=0,
            channels_per_head=channels_per_head,
            **unet_kwargs,
        )
        cemb = self.emb_noise.out_channels
        self.emb_text = MPConv(text_channels, cemb, kernel=[]) if text_channels else None
        self.emb_aug_fourier = MPFourier(self.emb_fourier.freqs.numel()) if augment_embedding else None
        self.emb_aug = MPConv(self.emb_fourier.freqs.numel(), cemb, kernel=[]) if augment_embedding else None
        if cond_channels:  # The first conv also reads the upsampled low-resolution image.
            name = next(iter(self.enc))
            self.enc[name] = MPConv(img_channels + cond_channels + 1, self.enc[name].out_channels, kernel=[3, 3])
        self.cross = torch.nn.ModuleDict(
            {
                f'{side}_{name}': CrossAttention(block.out_channels, text_channels, channels_per_head, cross_balance)
                for side, blocks in (('enc', self.enc), ('dec', self.dec))
                for name, block in blocks.items()
                if text_channels and getattr(block, 'num_heads', 0)
            }
        )

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: None = None,
        text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        cond: torch.Tensor | None = None,
        aug_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_text is not None:
            emb = mp_sum(emb, self.emb_text(text[1].to(emb.dtype)), t=self.label_balance)
        if self.emb_aug is not None:
            emb = mp_sum(emb, self.emb_aug(self.emb_aug_fourier(aug_labels)), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, cond.to(x.dtype)], dim=1) if cond is not None else x
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if 'conv' in name else block(x, emb)
            if f'enc_{name}' in self.cross:
                x = self.cross[f'enc_{name}'](x, text[0], text[2])
            skips.append(x)
        for name, block in self.dec.items():
            if 'block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
            if f'dec_{name}' in self.cross:
                x = self.cross[f'dec_{name}'](x, text[0], text[2])
        return self.out_conv(x, gain=self.out_gain)


# ----------------------------------------------------------------------------
# Preconditioning: captions -> text encoder; low-resolution image -> upsampled input channels.


@persistence.persistent_class
class TextPrecond(Precond):
    """EDM preconditioning (SPEC §3) of a TextUNet; `class_labels` are captions (list[str] or token ids)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool | str = True,
        sigma_data: float = 0.5,
        logvar_channels: int = 128,
        text_length: int = 48,
        tokenizer_path: str | None = None,
        text_channels: int = 128,
        text_layers: int = 2,
        text_encoder_path: str | None = None,
        lowres: int | None = None,
        residual: bool = False,
        **unet_kwargs,
    ):
        torch.nn.Module.__init__(self)
        if residual and not lowres:
            raise ValueError('residual=True needs a super-resolution net (lowres)')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = 0  # Captions, not classes: generate_images draws no random class.
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.lowres = lowres
        self.residual = residual
        if text_encoder_path:  # Frozen pretrained encoder with its own tokenizer; its width sets text_channels.
            self.tokenizer = make_tokenizer(text_length, tokenizer_path or text_encoder_path)
            self.text_encoder = FrozenTextEncoder(text_encoder_path, text_length)
            text_channels = self.text_encoder.channels
        else:
            self.tokenizer = make_tokenizer(text_length, tokenizer_path)
            self.text_encoder = (
                MPTextEncoder(
                    self.tokenizer.vocab_size, text_length=text_length, channels=text_channels, num_layers=text_layers
                )
                if text_channels
                else None
            )
        self.unet = TextUNet(
            img_resolution=img_resolution,
            img_channels=img_channels,
            text_channels=text_channels,
            cond_channels=img_channels if lowres else 0,
            augment_embedding=bool(lowres),
            **unet_kwargs,
        )
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def encode_text(
        self, captions: list[str] | torch.Tensor | None, batch_size: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(features, pooled, mask) of the captions; None or an empty list means empty captions."""
        if self.text_encoder is None:
            return None
        if captions is None or (isinstance(captions, torch.Tensor) and captions.ndim == 2 and captions.shape[1] == 0):
            captions = [''] * batch_size
        tokens = captions if isinstance(captions, torch.Tensor) else self.tokenizer(list(captions))
        return self.text_encoder(tokens.to(device))

    # Low-resolution conditioning: bicubic-upsampled to img_resolution, input to the U-Net scaled by 1/0.5 (the
    # pixel std EDM assumes); its augmentation level enters the embedding as c_aug = ln(σ_aug + 0.002) / 4.
    def _lowres_inputs(
        self, lowres: torch.Tensor, aug_sigma: float | torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        up = torch.nn.functional.interpolate(
            lowres.to(torch.float32), size=self.img_resolution, mode='bicubic', align_corners=False
        )
        aug = torch.as_tensor(aug_sigma, dtype=torch.float32, device=up.device).flatten().expand(n)
        return up, (aug + 0.002).log() / 4

    def forward(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: list[str] | torch.Tensor | None = None,
        force_fp32: bool = False,
        return_logvar: bool = False,
        lowres: torch.Tensor | None = None,
        aug_sigma: float | torch.Tensor = 0,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)
        dtype = self._compute_dtype(x.device, force_fp32)
        cond = aug_labels = None
        base = 0  # What the preconditioned denoiser works relative to: the upsampled input when residual.
        if self.lowres:
            if lowres is None:
                raise ValueError(f'this super-resolution net needs a {self.lowres}x{self.lowres} lowres image')
            up, aug_labels = self._lowres_inputs(lowres, aug_sigma, x.shape[0])
            cond = (up / 0.5).to(dtype)
            if self.residual:
                base = up
                x = x - base
        text = self.encode_text(class_labels, x.shape[0], x.device)

        # Preconditioning, EDM2 Eq. 21 / SPEC §3.
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (self.sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.flatten().log() / 4

        F_x = self.unet((c_in * x).to(dtype), c_noise, text=text, cond=cond, aug_labels=aug_labels)
        D_x = base + c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return D_x, logvar
