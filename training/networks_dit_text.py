"""Text-to-image MP-DiT: the magnitude-preserving DiT (training/networks_dit.py) conditioned on captions the
way the text U-Net is (training/networks_text.py), through MPDiT's hooks:
- the caption's pooled feature is an embedding term, MP-summed with the noise term like a class label;
- after every transformer block the tokens attend to the caption's token features (cross-attention as in
  GLIDE, Nichol et al. 2021, and PixArt-alpha, Chen et al. 2023), joined to the residual stream by MP-sum.

`TextPrecond(backbone='training.networks_dit_text.TextMPDiT', ...)` builds it in place of the TextUNet, with
the same text encoders and tokenizers, caption dropout and guidance by the empty caption.
"""

import torch

from torch_utils import persistence
from training.networks_dit import MPDiT
from training.networks_edm2 import MPConv
from training.networks_text import CrossAttention, TextInputs


@persistence.persistent_class
class TextMPDiT(MPDiT):
    """MPDiT plus a pooled-text embedding term and cross-attention after each block.

    forward(x, noise_labels, class_labels=None, text=None): `text` is a TextInputs triple (features,
    pooled, mask). Super-resolution inputs (`cond_channels`, `augment_embedding`) are the U-Net's only."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        text_channels: int = 0,
        cond_channels: int = 0,
        augment_embedding: bool = False,
        channels_per_head: int = 64,
        cross_balance: float = 0.3,
        **dit_kwargs,
    ):
        if cond_channels or augment_embedding:
            raise ValueError('super-resolution stages are U-Nets; a text MP-DiT takes captions only')
        super().__init__(img_resolution, img_channels, label_dim=label_dim, **dit_kwargs)
        hidden = self.emb_noise.out_channels
        self.emb_text = MPConv(text_channels, hidden, []) if text_channels else None
        # The U-Net's cross-attention works on feature maps [N, C, H, W]; tokens go in as [N, C, tokens, 1].
        self.cross = torch.nn.ModuleList(
            CrossAttention(hidden, text_channels, channels_per_head, cross_balance)
            for _ in (self.blocks if text_channels else ())
        )

    def embedding_terms(
        self, class_labels: torch.Tensor | None, emb: torch.Tensor, text: TextInputs | None = None, **kwargs
    ) -> list[torch.Tensor]:
        terms = super().embedding_terms(class_labels, emb)
        if self.emb_text is not None:
            terms.append(self.emb_text(text[1].to(torch.float32)))
        return terms

    def after_block(self, index: int, tokens: torch.Tensor, text: TextInputs | None = None, **kwargs) -> torch.Tensor:
        if not len(self.cross):
            return tokens
        as_map = tokens.mT.unsqueeze(3)
        return self.cross[index](as_map, text[0], text[2]).squeeze(3).mT
