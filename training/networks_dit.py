"""Diffusion transformers: DiT (Peebles & Xie 2023, arXiv 2212.09748) and a magnitude-preserving DiT.

`DiT` follows the paper's adaLN-Zero design, with parameter names and shapes equal to those of the
released checkpoints (`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`, plain state dicts), so that
`training.dit_checkpoints.load_dit_checkpoint` builds the matching net and loads them strictly. It predicts epsilon (and, with
learned sigma, the variance interpolation value v) from a noisy latent, an integer DDPM timestep and a
class index; index `num_classes` is the null label of classifier-free guidance.

`MPDiT` is the same token pipeline built from EDM2's magnitude-preserving layers (Karras et al. 2024):
forced weight normalisation, MP-sum residuals, no affine normalisation and no biases, learned gains in
place of adaLN-Zero's gates. Its signature, forward(x, noise_labels, class_labels), is that of the EDM2
U-Net, so EDM preconditioning (c_in, c_noise = ln(sigma)/4, c_skip, c_out) can wrap it unchanged.
"""

import contextlib
import math

import numpy as np
import torch
from torch.nn.functional import gelu, layer_norm

from torch_utils import persistence
from training.networks_edm2 import (
    MPConv,
    MPFourier,
    attention,
    attention_dtype,
    compute_dtype,
    mp_silu,
    mp_sum,
    normalize,
)

# Model sizes of DiT's Table 1 (depth, hidden size, heads) for every patch size of Table 4.
DIT_SIZES = {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}
DIT_CONFIGS = {
    f'DiT-{size}/{patch}': dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in DIT_SIZES.items()
    for patch in (2, 4, 8)
}


def _check_geometry(input_size: int, patch_size: int, hidden_size: int, num_heads: int) -> None:
    if patch_size < 1 or input_size % patch_size != 0:
        raise ValueError(f'DiT patch size {patch_size} does not divide the input size {input_size}.')
    if hidden_size % num_heads != 0 or hidden_size % 4 != 0:
        raise ValueError(f'DiT hidden size {hidden_size} must be a multiple of 4 and of num_heads={num_heads}.')


def autocast_to(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for DiT's plain layers: under bfloat16/float16 autocast their matrix products, convolutions
    and attention compute in `dtype` from float32 master weights, normalisations and sums stay float32 (DiT has
    no magnitude-preserving layers that take their dtype from the input). Nothing for float32, nor on the meta
    device (flop counting), which has no autocast."""
    if dtype == torch.float32 or device.type == 'meta':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# 2-D sine-cosine position embedding of MAE (He et al. 2022), as DiT uses it: channels [0, D/2) encode
# a token's column, [D/2, D) its row; each half is [sin(pos*w), cos(pos*w)], w_i = 10000^(-4i/D).
def sincos_pos_embed(hidden_size: int, grid_size: int) -> torch.Tensor:
    omega = 1.0 / 10000 ** (np.arange(hidden_size // 4, dtype=np.float64) / (hidden_size // 4))
    row, col = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing='ij')
    angles = [np.outer(axis.reshape(-1), omega) for axis in (col, row)]
    table = np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)], axis=1)
    return torch.tensor(table, dtype=torch.float32).unsqueeze(0)


# Sinusoidal timestep features of DiT's timestep embedder: [cos(t*f), sin(t*f)], f_i = 10000^(-i/(dim/2)).
def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000) -> torch.Tensor:
    freqs = torch.exp(-math.log(max_period) / (dim // 2) * torch.arange(dim // 2, device=t.device))
    angles = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


# adaLN: scale and shift a layer-normalised token sequence per sample (DiT Sec. 3.2).
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def unpatchify(tokens: torch.Tensor, patch_size: int, grid_size: int) -> torch.Tensor:
    """[N, T, p*p*C] tokens, each ordered (p_row, p_col, channel) -> [N, C, grid*p, grid*p] image."""
    n, _, d = tokens.shape
    c = d // patch_size**2
    x = tokens.reshape(n, grid_size, grid_size, patch_size, patch_size, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, grid_size * patch_size, grid_size * patch_size)


# ----------------------------------------------------------------------------
# DiT with adaLN-Zero blocks.


def _named(**children: torch.nn.Module) -> torch.nn.Module:
    """A plain module holding `children` under the names that the released state dicts use."""
    module = torch.nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


def _modulation(hidden_size: int, chunks: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(hidden_size, chunks * hidden_size))


@persistence.persistent_class
class DiTBlock(torch.nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.num_heads = num_heads
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.attn = _named(
            qkv=torch.nn.Linear(hidden_size, 3 * hidden_size), proj=torch.nn.Linear(hidden_size, hidden_size)
        )
        self.mlp = _named(fc1=torch.nn.Linear(hidden_size, mlp_hidden), fc2=torch.nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = _modulation(hidden_size, 6)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.attn.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.attn.proj(attention(q, k, v).transpose(1, 2).reshape(n, t, d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(modulate(x, shift1, scale1))
        y = self.mlp.fc2(gelu(self.mlp.fc1(modulate(x, shift2, scale2)), approximate='tanh'))
        return x + gate2[:, None] * y


@persistence.persistent_class
class DiT(torch.nn.Module):
    # Compute precision as Precond's use_fp16: 'bf16' runs under bfloat16 autocast, True or 'fp16' under float16
    # autocast on CUDA (float32 output either way), False in the dtype of the weights. Not a constructor
    # option, so that released checkpoints build unchanged; --precision (prepare_for_sampling) sets it.
    use_fp16 = False

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        _check_geometry(input_size, patch_size, hidden_size, num_heads)
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes, self.class_dropout_prob, self.learn_sigma = num_classes, class_dropout_prob, learn_sigma
        self.grid_size = input_size // patch_size
        self.x_embedder = _named(proj=torch.nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size))
        t_mlp = [torch.nn.Linear(256, hidden_size), torch.nn.SiLU(), torch.nn.Linear(hidden_size, hidden_size)]
        self.t_embedder = _named(mlp=torch.nn.Sequential(*t_mlp))
        self.y_embedder = _named(embedding_table=torch.nn.Embedding(num_classes + 1, hidden_size))
        self.register_buffer('pos_embed', sincos_pos_embed(hidden_size, self.grid_size))
        self.blocks = torch.nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        out_linear = torch.nn.Linear(hidden_size, patch_size**2 * self.out_channels)
        self.final_layer = _named(adaLN_modulation=_modulation(hidden_size, 2), linear=out_linear)
        self.reset_parameters()

    # ViT initialisation (Xavier-uniform linears, zero biases), the patch conv treated as a linear,
    # N(0, 0.02^2) label table and timestep MLP, and zeros for every adaLN modulation and the output
    # linear, so that each block starts as the identity (adaLN-Zero, DiT Sec. 3.2).
    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                torch.nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
                torch.nn.init.zeros_(module.bias)
        torch.nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for index in (0, 2):
            torch.nn.init.normal_(self.t_embedder.mlp[index].weight, std=0.02)
        zeroed = [block.adaLN_modulation[1] for block in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]
        for linear in zeroed:
            torch.nn.init.zeros_(linear.weight)
            torch.nn.init.zeros_(linear.bias)

    # Class indices from indices or from edm2x's one-hot rows (an all-zero row is the null label); in
    # training, a label becomes the null label with probability p (classifier-free guidance training).
    def label_indices(self, y: torch.Tensor) -> torch.Tensor:
        if y.ndim == 2:  # argmax of an empty row (a net without classes) would fail; such rows are null labels
            y = torch.where(y.any(dim=1), y.argmax(dim=1) if y.shape[1] else 0, self.num_classes)
        if not self.training or self.class_dropout_prob <= 0:
            return y
        drop = torch.rand(y.shape, device=y.device) < self.class_dropout_prob
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Prediction [N, out_channels, H, W] for latents x, timesteps t (0..999, scalar or [N]) and labels y
        (None: null labels), computed in the dtype of the weights (float16 snapshots run as float16) unless
        `use_fp16` asks for mixed precision."""
        dtype = compute_dtype(self.use_fp16, x.device)
        if dtype == torch.float32:
            return self._predict(x, t, y)
        with autocast_to(dtype, x.device):
            return self._predict(x, t, y).to(torch.float32)

    def _predict(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        y = torch.full([x.shape[0]], self.num_classes, device=x.device) if y is None else y
        x = x.to(self.x_embedder.proj.weight.dtype)
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        t_emb = self.t_embedder.mlp(timestep_features(t.reshape(-1).expand(x.shape[0])).to(tokens.dtype))
        c = t_emb + self.y_embedder.embedding_table(self.label_indices(y))
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        tokens = self.final_layer.linear(modulate(tokens, shift, scale))
        return unpatchify(tokens, self.patch_size, self.grid_size)


# ----------------------------------------------------------------------------
# Magnitude-preserving DiT: EDM2's layers (Karras et al. 2024, Sec. 3) on DiT's token pipeline.


# Depthwise 3x3 convolution over the square token grid (the convolutional MLP of PVTv2, Wang et al. 2022, and
# SegFormer's Mix-FFN): each hidden channel mixes with its 8 neighbouring tokens, the locality attention
# lacks. Magnitude preserving as every MPConv: each channel's 9 taps form a unit vector.
@persistence.persistent_class
class MPTokenConv(MPConv):
    def __init__(self, channels: int):
        super().__init__(1, channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        grid = math.isqrt(t)
        x = x.transpose(1, 2).reshape(n, d, grid, grid)
        x = torch.nn.functional.conv2d(x, self.used_weight(x.dtype), padding=1, groups=d)
        return x.reshape(n, d, t).transpose(1, 2)


# Pre-norm transformer block whose per-sample modulation takes EDM2's form: multiply by 1 + Linear(emb)
# with a learned gain that starts at 0, so every block starts with unit modulation, no path zeroed
# (adaLN-Zero's gates would zero it), and residuals join by MP-sum (Eq. 88).
@persistence.persistent_class
class MPDiTBlock(torch.nn.Module):
    def __init__(
        self,
        hidden_size: int,
        emb_channels: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attn_balance: float = 0.3,
        mlp_balance: float = 0.3,
        dropout: float = 0.0,
        conv_mlp: bool = False,
    ):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.attn_balance, self.mlp_balance = attn_balance, mlp_balance
        self.attn_emb, self.mlp_emb = (MPConv(emb_channels, hidden_size, kernel=[]) for _ in range(2))
        self.attn_emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.mlp_emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.attn_qkv = MPConv(hidden_size, 3 * hidden_size, kernel=[])
        self.attn_proj = MPConv(hidden_size, hidden_size, kernel=[])
        self.mlp_fc1 = MPConv(hidden_size, int(hidden_size * mlp_ratio), kernel=[])
        self.mlp_fc2 = MPConv(int(hidden_size * mlp_ratio), hidden_size, kernel=[])
        self.mlp_conv = MPTokenConv(int(hidden_size * mlp_ratio)) if conv_mlp else None

    # Cosine attention of EDM2's U-Net: q, k and v normalised per head before the softmax.
    def attention(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.attn_qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).to(attention_dtype(x))
        q, k, v = normalize(qkv, dim=4).permute(2, 0, 3, 1, 4)
        return self.attn_proj(attention(q, k, v).transpose(1, 2).reshape(n, t, d).to(x.dtype))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = normalize(x, dim=2)  # "pixel norm" of the residual stream, per token
        c = self.attn_emb(emb, gain=self.attn_emb_gain) + 1
        x = mp_sum(x, self.attention(x * c[:, None]), t=self.attn_balance)
        c = self.mlp_emb(emb, gain=self.mlp_emb_gain) + 1
        y = self.mlp_fc1(x * c[:, None])
        y = mp_silu(y if self.mlp_conv is None else self.mlp_conv(y))
        y = self.mlp_fc2(torch.nn.functional.dropout(y, p=self.dropout, training=self.training))
        return mp_sum(x, y, t=self.mlp_balance)


@persistence.persistent_class
class MPDiT(torch.nn.Module):
    """Backbone F(x; c_noise, class) with the EDM2 U-Net's signature, for EDM preconditioning."""

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        attn_balance: float = 0.3,
        mlp_balance: float = 0.3,
        label_balance: float = 0.5,
        pos_balance: float = 0.5,
        dropout: float = 0.0,
        conv_mlp: bool = False,
    ):
        super().__init__()
        _check_geometry(img_resolution, patch_size, hidden_size, num_heads)
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.patch_size, self.grid_size = patch_size, img_resolution // patch_size
        self.label_balance, self.pos_balance = label_balance, pos_balance
        self.emb_fourier = MPFourier(hidden_size)
        self.emb_noise = MPConv(hidden_size, hidden_size, kernel=[])
        self.emb_label = MPConv(label_dim, hidden_size, kernel=[]) if label_dim else None
        # Patches with a constant ones channel, as EDM2's U-Net input, so tokens need no bias.
        self.patch_embed = MPConv((img_channels + 1) * patch_size**2, hidden_size, kernel=[])
        self.register_buffer('pos_embed', sincos_pos_embed(hidden_size, self.grid_size) * math.sqrt(2))
        self.blocks = torch.nn.ModuleList(
            MPDiTBlock(hidden_size, hidden_size, num_heads, mlp_ratio, attn_balance, mlp_balance, dropout, conv_mlp)
            for _ in range(depth)
        )
        self.out_emb = MPConv(hidden_size, hidden_size, kernel=[])
        self.out_emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.out_linear = MPConv(hidden_size, patch_size**2 * img_channels, kernel=[])
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

    def embedding_terms(self, class_labels: torch.Tensor | None, emb: torch.Tensor, **kwargs) -> list[torch.Tensor]:
        """Conditioning terms MP-summed into the noise embedding `emb`: the class label, one-hot scaled to unit
        RMS (None: all-zero rows). Subclasses add their own (text: training/networks_dit_text.py)."""
        if self.emb_label is None:
            return []
        labels = torch.zeros_like(emb[:, :1]).expand(-1, self.label_dim) if class_labels is None else class_labels
        return [self.emb_label(labels.to(emb.dtype) * math.sqrt(self.label_dim))]

    def after_block(self, index: int, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """Runs after transformer block `index`; nothing here."""
        return tokens

    def embedding(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None, **kwargs) -> torch.Tensor:
        """MP-SiLU of the noise term MP-summed with each conditioning term in turn, as in EDM2's U-Net."""
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        for term in self.embedding_terms(class_labels, emb, **kwargs):
            emb = mp_sum(emb, term, t=self.label_balance)
        return mp_silu(emb)

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        n, p, g = x.shape[0], self.patch_size, self.grid_size
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        patches = x.reshape(n, -1, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, -1)
        tokens = mp_sum(self.patch_embed(patches), self.pos_embed.to(x.dtype), t=self.pos_balance)
        emb = self.embedding(noise_labels, class_labels, **kwargs).to(x.dtype)
        for index, block in enumerate(self.blocks):
            tokens = self.after_block(index, block(tokens, emb), **kwargs)
        c = self.out_emb(emb, gain=self.out_emb_gain) + 1
        tokens = self.out_linear(normalize(tokens, dim=2) * c[:, None], gain=self.out_gain)
        return unpatchify(tokens, p, g)
