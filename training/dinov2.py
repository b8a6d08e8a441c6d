"""DINOv2 vision transformer (Oquab et al. 2023), the FD-DINOv2 feature extractor (Stein et al. 2023).

Parameter names follow Meta's published checkpoints (`dinov2_vitl14_pretrain.pth`: `cls_token`,
`pos_embed`, `patch_embed.proj`, `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}`,
`norm`), so those files load as is. The features are the final-norm class token of images resized to
224x224 (bicubic with antialiasing, from the 0..255 range) and normalised with ImageNet's mean and std.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

DINOV2_RESOLUTION = 224
DINOV2_HEAD_CHANNELS = 64  # every published DINOv2 ViT (S, B, L, g) uses 64 channels per head
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with layer scale on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT; defaults are ViT-L/14 as published (pretrained at 518 px: 37x37 position grid)."""

    def __init__(
        self, embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, patch_size: int = 14, pos_grid: int = 37
    ) -> None:
        super().__init__()
        self.feature_dim = embed_dim
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid * pos_grid + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a grid_h x grid_w patch grid, resampled as DINOv2 does."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = math.isqrt(patch_pos.shape[1])
        if (grid_h, grid_w) == (side, side):
            return self.pos_embed
        patch_pos = patch_pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # DINOv2 passes a scale factor with a +0.1 offset (not a size); the bicubic kernel then
        # maps coordinates with that exact factor, which changes the values, so keep it.
        scale = ((grid_h + 0.1) / side, (grid_w + 0.1) / side)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode='bicubic')
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([cls_pos, patch_pos.to(cls_pos.dtype)], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float NCHW images in, final-norm class token out."""
        grid_h, grid_w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_embed(grid_h, grid_w)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8-range NCHW RGB images of any size in, class-token features out."""
        # Contiguous first: the antialiased bicubic kernel rounds differently for channels-last input.
        x = images.to(torch.float32).contiguous()
        x = F.interpolate(x, size=(DINOV2_RESOLUTION, DINOV2_RESOLUTION), mode='bicubic', antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
        return self.forward_features((x / 255 - mean) / std)


def vit_kwargs_from_state_dict(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Architecture of a DINOv2 ViT-S/B/L checkpoint, read from its tensor shapes (64-channel heads).
    ViT-g's SwiGLU feed-forward and the register tokens of the *_reg4 checkpoints are not implemented."""
    embed_dim = state['cls_token'].shape[-1]
    depth = 1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.'))
    return dict(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // DINOV2_HEAD_CHANNELS,
        patch_size=state['patch_embed.proj.weight'].shape[-1],
        pos_grid=math.isqrt(state['pos_embed'].shape[1] - 1),
    )
