"""Text-conditioned and super-resolution EDM2 nets: cross-attention, pooled text, low-resolution input.

The denoiser is EDM2's U-Net and preconditioning (training/networks_edm2.py), extended through its hooks
rather than copied; each addition is off unless asked for:
- the caption's pooled feature joins the embedding like the class label (`UNet.embedding_terms`), and
  its token features enter through cross-attention after every self-attention block (`UNet.after_block`;
  GLIDE, Nichol et al. 2021; Imagen, Saharia et al. 2022);
- a super-resolution stage reads the low-resolution image, bicubic-upsampled, as extra input channels
  (`UNet(cond_channels=)`), and the level of its noise augmentation joins the embedding like the noise
  level (Imagen's noise conditioning augmentation);
- with `residual=True` the stage denoises the image minus that upsampled input, the detail bicubic
  interpolation misses (a residual formulation, as in ResShift, Yue et al. 2023); `sigma_data` is then
  the residual's std, and an untrained net already returns the bicubic image (`Precond.conditioning`).

The caption encoder is trained with the net (MPTextEncoder) unless `text_encoder_path` names a local
Hugging Face model to use frozen (FrozenTextEncoder), whose weights stay outside the net's pickles.
`class_labels` of `TextPrecond` are captions: a list of strings or token ids [N, text_length]; None or ''
is the empty caption, the unconditional prediction for classifier-free guidance (caption dropout).
"""

import math

import torch

import dnnlib
from torch_utils import persistence
from training.networks_edm2 import SIGMA_DATA, MPConv, MPFourier, Precond, UNet, mp_sum
from training.text import FrozenTextEncoder, MPTextEncoder, make_tokenizer, mp_attention

TEXT_LENGTH = 48  # Caption tokens a text net reads by default (train_edm2.py grows it to fit the data).

# (features [N, L, C], pooled [N, C], mask [N, L]) from a text encoder.
TextInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# MP cross-attention: queries from a 1x1 MP conv of the image, keys and values from the caption's
# token features, each normalised per head as in EDM2's self-attention; the result is projected and
# joined to x by MP-sum (EDM2 Eq. 88).
@persistence.persistent_class
class CrossAttention(torch.nn.Module):
    def __init__(self, channels: int, text_channels: int, channels_per_head: int = 64, balance: float = 0.3):
        super().__init__()
        self.num_heads = max(1, channels // channels_per_head)
        self.balance = balance
        self.q = MPConv(channels, channels, [1, 1])
        self.kv = MPConv(text_channels, 2 * channels, [])
        self.proj = MPConv(channels, channels, [1, 1])

    def forward(self, x: torch.Tensor, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        queries = self.q(x).flatten(2).mT  # [N, pixels, C]
        keys, values = self.kv(features.to(x.dtype)).chunk(2, dim=2)
        attended = mp_attention(queries, keys, values, self.num_heads, mask)
        return mp_sum(x, self.proj(attended.mT.reshape(x.shape)), t=self.balance)


def position_features(channels: int, resolution: int, device: torch.device) -> torch.Tensor:
    """[1, channels, H, W] Fourier features of each pixel's coordinates (CoordConv, Liu et al. 2018, in the
    frequencies of NeRF's positional encoding): per octave k, sin and cos of 2^k·π·u for u = x and y in
    [0, 1], scaled by √2 to unit RMS as EDM2's layers expect. Convolutions alone see position only through
    the border padding; a caption that names a place needs the net to know where each pixel is."""
    u = (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5) / resolution
    features = []
    for k in range(channels // 4):
        angle = (2**k * math.pi) * u
        for f in (torch.sin(angle), torch.cos(angle)):
            features += [f[None, :].expand(resolution, -1), f[:, None].expand(-1, resolution)]
    return (
        (torch.stack(features) * math.sqrt(2)).unsqueeze(0)
        if features
        else torch.zeros([1, 0, resolution, resolution], device=device)
    )


@persistence.persistent_class
class TextUNet(UNet):
    """EDM2's U-Net plus a pooled-text and an augmentation-level embedding term, cross-attention after
    the self-attention blocks and `cond_channels` low-resolution input channels.

    forward(x, noise_labels, class_labels=None, text=None, cond=None, aug_labels=None): `text` is a
    TextInputs triple, `aug_labels` the augmentation level's c_noise."""

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
            cond_channels=cond_channels,
            channels_per_head=channels_per_head,
            **unet_kwargs,
        )
        noise_channels, emb_channels = self.emb_noise.weight.shape[1], self.emb_noise.out_channels
        self.emb_text = MPConv(text_channels, emb_channels, []) if text_channels else None
        self.emb_aug_fourier = MPFourier(noise_channels) if augment_embedding else None
        self.emb_aug = MPConv(noise_channels, emb_channels, []) if augment_embedding else None
        self.cross = torch.nn.ModuleDict()
        for side, blocks in (('enc', self.enc), ('dec', self.dec)):
            for name, block in blocks.items():
                if text_channels and getattr(block, 'num_heads', 0):
                    self.cross[f'{side}_{name}'] = CrossAttention(
                        block.out_channels, text_channels, channels_per_head, cross_balance
                    )

    def embedding_terms(
        self, class_labels: None, text: TextInputs | None = None, aug_labels: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Pooled text, then the augmentation level: MP-summed into the noise embedding in that order."""
        terms = []
        if self.emb_text is not None:
            terms.append(self.emb_text(text[1].to(torch.float32)))
        if self.emb_aug is not None:
            terms.append(self.emb_aug(self.emb_aug_fourier(aug_labels)))
        return terms

    def after_block(
        self, side: str, name: str, x: torch.Tensor, text: TextInputs | None = None, **kwargs
    ) -> torch.Tensor:
        layer = self.cross[f'{side}_{name}'] if f'{side}_{name}' in self.cross else None
        return x if layer is None else layer(x, text[0], text[2])


@persistence.persistent_class
class TextPrecond(Precond):
    """EDM preconditioning of a TextUNet: captions through the text encoder, and for super-resolution
    stages (`lowres` = the low-resolution size) the low-resolution image and its augmentation level.

    forward(x, sigma, class_labels=captions, force_fp32=False, return_logvar=False, lowres=None,
    aug_sigma=0)."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool | str = True,
        sigma_data: float = SIGMA_DATA,
        logvar_channels: int = 128,
        text_length: int = TEXT_LENGTH,
        tokenizer_path: str | None = None,
        text_tokens: str = 'bytes',
        text_channels: int = 128,
        text_layers: int = 2,
        text_encoder_path: str | None = None,
        lowres: int | None = None,
        residual: bool = False,
        position_channels: int = 0,
        **unet_kwargs,
    ):
        if residual and not lowres:
            raise ValueError('residual=True needs a super-resolution net (lowres)')
        # label_dim is ignored: captions, not classes, condition this net (generate_images draws no class).
        super().__init__(
            img_resolution,
            img_channels,
            label_dim=0,
            use_fp16=use_fp16,
            sigma_data=sigma_data,
            logvar_channels=logvar_channels,
            text_length=text_length,
            tokenizer_path=tokenizer_path,
            text_tokens=text_tokens,
            text_channels=text_channels,
            text_layers=text_layers,
            text_encoder_path=text_encoder_path,
            lowres=lowres,
            position_channels=position_channels,
            **unet_kwargs,
        )
        self.lowres, self.residual, self.position_channels = lowres, residual, position_channels

    def make_unet(
        self,
        text_length: int,
        tokenizer_path: str | None,
        text_tokens: str,
        text_channels: int,
        text_layers: int,
        text_encoder_path: str | None,
        lowres: int | None,
        label_dim: int,
        position_channels: int,
        **unet_kwargs,
    ) -> torch.nn.Module:
        """Registers the tokenizer and text encoder (before the U-Net), then builds the TextUNet (or the
        `backbone` class, e.g. training.networks_dit_text.TextMPDiT, with the same keyword arguments)."""
        self.tokenizer = make_tokenizer(text_length, tokenizer_path or text_encoder_path, text_tokens)
        if text_encoder_path:  # A frozen pretrained encoder: its width sets text_channels.
            self.text_encoder = FrozenTextEncoder(text_encoder_path, text_length)
            text_channels = self.text_encoder.channels
        elif text_channels:
            vocab_size = self.tokenizer.vocab_size
            self.text_encoder = MPTextEncoder(vocab_size, text_length, channels=text_channels, num_layers=text_layers)
        else:
            self.text_encoder = None
        if position_channels % 4 or (position_channels and self.backbone is not None):
            raise ValueError('position_channels: a multiple of 4, for the U-Net (transformer tokens carry positions)')
        network = TextUNet if self.backbone is None else dnnlib.util.get_obj_by_name(self.backbone)
        return network(
            text_channels=text_channels,
            cond_channels=(unet_kwargs['img_channels'] if lowres else 0) + position_channels,
            augment_embedding=bool(lowres),
            **unet_kwargs,
        )

    def encode_text(
        self, captions: list[str] | torch.Tensor | None, batch_size: int, device: torch.device
    ) -> TextInputs | None:
        """(features, pooled, mask) of the captions; None or token ids of width 0 mean empty captions."""
        if self.text_encoder is None:
            return None
        if captions is None or (isinstance(captions, torch.Tensor) and captions.ndim == 2 and captions.shape[1] == 0):
            captions = [''] * batch_size
        tokens = captions if isinstance(captions, torch.Tensor) else self.tokenizer(list(captions))
        return self.text_encoder(tokens.to(device))

    def conditioning(
        self,
        x: torch.Tensor,
        class_labels: list[str] | torch.Tensor | None,
        dtype: torch.dtype,
        lowres: torch.Tensor | None = None,
        aug_sigma: float | torch.Tensor = 0,
    ) -> tuple[torch.Tensor | float, dict]:
        """Captions -> text inputs. Super-resolution: the low-resolution image, bicubic-upsampled and divided
        by EDM's σ_data (the pixel std), as input channels; the augmentation level as c_aug = ln(σ_aug + 0.002)/4
        (EDM's c_noise with a floor at σ_min); with `residual` the upsampled image is the base."""
        inputs = dict(text=self.encode_text(class_labels, len(x), x.device))
        positions = position_features(self.position_channels, self.img_resolution, x.device).expand(len(x), -1, -1, -1)
        if not self.lowres:
            if self.position_channels:
                inputs.update(cond=positions.to(dtype))
            return 0, inputs
        if lowres is None:
            raise ValueError(f'this super-resolution net needs a {self.lowres}x{self.lowres} lowres image')
        up = torch.nn.functional.interpolate(
            lowres.float(), size=self.img_resolution, mode='bicubic', align_corners=False
        )
        aug = torch.as_tensor(aug_sigma, dtype=torch.float32, device=up.device).flatten().expand(len(x))
        inputs.update(cond=torch.cat([up / SIGMA_DATA, positions], dim=1).to(dtype), aug_labels=(aug + 0.002).log() / 4)
        return (up if self.residual else 0), inputs
