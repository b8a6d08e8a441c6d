"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, arXiv 2312.02696, config G: Fig. 21, App. B) and
the EDM preconditioning (Karras et al. 2022, arXiv 2206.00364, Table 1) with EDM2's learned uncertainty
u(σ) (Eq. 21). Every layer keeps unit expected magnitude: no biases, no group norm, normalised weights.

Extensions (text, super-resolution, the CLIP image tower) reuse these classes through hooks:
`UNet.embedding_terms` (extra embedding terms, joined by MP-sum), `UNet(cond_channels=)` with
`forward(cond=)` (extra input channels), `UNet.after_block` (work after each block),
`Precond.make_unet` (what F is) and `Precond.conditioning` (what F is given, and a base D works
relative to). `build_encoder` / `run_encoder` are the encoder half alone, `edm_coefficients` the
preconditioning alone.
"""

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.utils.checkpoint
from torch.nn.functional import scaled_dot_product_attention

import dnnlib
from torch_utils import persistence

SIGMA_DATA = 0.5  # EDM's σ_data, the std of the training data (EDM Table 1).

# ----------------------------------------------------------------------------
# Magnitude-preserving operations (EDM2 App. B).


# x / (ε + ‖x‖/sqrt(N)) per slice, the norm over `dim` (default: all but the first axis) of N elements.
# The norm is sqrt(Σx²) in float32: 7-12x faster on CPU than vector_norm over a middle axis (pixel norm,
# attention heads). Clamping Σx² keeps the gradient at an all-zero slice (zero text features at padding)
# at 0 where sqrt's would be NaN, and moves no norm that matters next to ε. On CPU a bf16/fp16 x is divided
# in float32 and rounded once: CPU bf16 divides that broadcast along the innermost axis (the channels of a
# channels-last pixel norm, of a token) ran 15-20x slower than in float32.
def normalize(x: torch.Tensor, dim: int | list[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    dims = list(range(1, x.ndim)) if dim is None else dim
    x32 = x.to(torch.float32)
    norm = x32.square().sum(dim=dims, keepdim=True).clamp_min(1e-30).sqrt()
    rms = norm * math.sqrt(norm.numel() / x.numel())
    if x.device.type == 'cpu' and x.dtype != torch.float32:
        return (x32 / (eps + rms)).to(x.dtype)
    return x / (eps + rms).to(x.dtype)


# Mixed precision on CPU leaves attention in float32: torch's CPU attention backward ran 1.6-3.7x slower in
# bfloat16 than in float32, and bf16 per-head normalisation 2x slower (docs/benchmarks.md). attention_dtype gives
# the dtype to form q, k, v in; attention computes in the dtype of q, k, v with autocast off on CPU.
def attention_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == 'cpu' else x.dtype


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(c)) v of [n, heads, tokens, c] tensors, keys where the boolean `mask` (broadcast to
    [n, heads, queries, keys]) is True; on CPU in float32 (result in q's dtype)."""
    if q.device.type != 'cpu' or q.dtype == torch.float32:
        return scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.autocast('cpu', enabled=False):
        return scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)


# MP-SiLU, EDM2 Eq. 81: 0.596 = sqrt(E[silu(z)²]) for z ~ N(0, 1).
def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x).div_(0.596)  # in place: silu's backward reads its input only


# MP-sum, EDM2 Eq. 88: a blend with weight t on b that keeps unit variance.
def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    return torch.lerp(a, b, t).div_(math.hypot(1 - t, t))  # in place: lerp's backward keeps no tensors


# MP-cat, EDM2 Eq. 103: concatenation whose parts share the energy as (1-t)² : t².
def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(na)), b * (scale * t / math.sqrt(nb))], dim=dim)


# Activation clipping to [-limit, limit] (EDM2 Fig. 21: 256 after every block), x.clip's values and gradients:
# the gradient passes where -limit <= x <= limit (and, unlike x.clip's, at a NaN x). Its backward is one
# hardtanh_backward pass with bounds one step of x's dtype outside ±limit (hardtanh's own interval is open),
# where x.clip's ran four (ge, le, and, where): forward and backward at [64, 64, 32, 32] on CPU 12.7 -> 5.4 ms
# in fp32, 10.8 -> 2.5 ms in bf16.
def clip(x: torch.Tensor, limit: float) -> torch.Tensor:
    return _Clip.apply(x, limit) if torch.is_grad_enabled() and x.requires_grad else x.clamp(-limit, limit)


class _Clip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, limit: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.edge = limit + 2.0 ** math.floor(math.log2(limit)) * torch.finfo(x.dtype).eps  # next value of x's dtype
        return x.clamp(-limit, limit)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, x, -ctx.edge, ctx.edge), None


# Separable 2x resampling by the filter f (EDM2 Fig. 21: a 2x2 box): 'down' averages, 'up' spreads
# each pixel over the filter's footprint (a transposed conv with 4x gain), 'keep' is the identity.
# The box filter, which every preset uses, runs as 2x2 average pooling and nearest-neighbour upsampling:
# the same values (up exactly, down up to the order of the 4-term sum), and on CPU in bf16 the depthwise
# convolutions ran 7-18 ms per call against 0.2-2 ms for these (docs/benchmarks.md).
def resample(x: torch.Tensor, f: list[float] = [1, 1], mode: str = 'keep') -> torch.Tensor:
    if mode not in ('keep', 'down', 'up'):
        raise ValueError(f"resample mode must be 'keep', 'down' or 'up', not {mode!r}")
    if mode == 'keep':
        return x
    if len(f) == 2 and f[0] == f[1] != 0:
        if mode == 'down':
            return torch.nn.functional.avg_pool2d(x, 2)
        return torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')
    return resample_by_conv(x, f, mode)


def resample_by_conv(x: torch.Tensor, f: list[float], mode: str) -> torch.Tensor:
    """resample() of any separable filter as a depthwise (transposed) convolution."""
    taps = torch.as_tensor(f, dtype=torch.float32)
    taps = taps / taps.sum()
    kernel = torch.outer(taps, taps).to(x.device, x.dtype).expand(x.shape[1], 1, len(f), len(f))
    trim = (len(f) - 1) // 2  # Pads 'down' and crops 'up' so that the output is exactly 2x smaller or larger.
    if mode == 'down':
        return torch.nn.functional.conv2d(x, kernel, stride=2, padding=trim, groups=x.shape[1])
    return torch.nn.functional.conv_transpose2d(x, kernel * 4, stride=2, padding=trim, groups=x.shape[1])


# MP-Fourier features, EDM2 Eq. 75: sqrt(2)·cos(2π(f·x + φ)), f ~ N(0, bandwidth²), φ ~ U[0, 1);
# the buffers hold 2π·f and 2π·φ.
@persistence.persistent_class
class MPFourier(torch.nn.Module):
    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer('freqs', 2 * math.pi * bandwidth * torch.randn(num_channels))
        self.register_buffer('phases', 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angle = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (math.sqrt(2) * angle.cos()).to(x.dtype)


# MP convolution (kernel [kh, kw]) or linear layer (kernel []), EDM2 Eq. 47 and 66: the weight is
# used as normalize(w)·gain/sqrt(fan_in). Forced weight normalisation (EDM2 §2.2): in training the
# stored weight itself is first replaced by normalize(w), so its norm cannot grow.
# In eval mode without autograd the used weight is kept and reused until the stored weight or gain
# changes (their tensor version counters: load_state_dict, optimiser steps), train() or a move.
@persistence.persistent_class
class MPConv(torch.nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: list[int]):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = torch.nn.Parameter(torch.randn([out_channels, in_channels, *kernel]))

    @torch.no_grad()
    def _force_unit_rows(self, w32: torch.Tensor) -> None:
        self.weight.copy_(normalize(w32))

    def _used_weight(self, dtype: torch.dtype, gain: float | torch.Tensor) -> torch.Tensor:
        w32 = self.weight.to(torch.float32)  # fp16-stored weights are normalised in float32
        if self.training and not getattr(self, 'forcing_off', False):
            self._force_unit_rows(w32)
        return (normalize(w32) * gain / math.sqrt(w32[0].numel())).to(dtype)

    def _cache_key(self, dtype: torch.dtype, gain: float | torch.Tensor) -> tuple | None:
        """What the used weight depends on, or None where it must be recomputed (training, autograd, tracing)."""
        tensors = [self.weight] + ([gain] if torch.is_tensor(gain) else [])
        if self.training or torch.compiler.is_compiling():
            return None
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return None
        if torch.is_tensor(gain) and not isinstance(gain, torch.nn.Parameter):
            return None  # a computed gain: no identity to key on
        gain_key = (gain.data_ptr(), gain._version) if torch.is_tensor(gain) else gain
        return (self.weight.data_ptr(), self.weight._version, self.weight.device, dtype, gain_key)

    def used_weight(self, dtype: torch.dtype, gain: float | torch.Tensor = 1) -> torch.Tensor:
        """normalize(w)·gain/sqrt(fan_in) in `dtype`, from the eval-mode cache where it is valid."""
        key = self._cache_key(dtype, gain)
        cache = getattr(self, '_eval_cache', None)
        if key is None:
            return self._used_weight(dtype, gain)
        if cache is not None and cache[0] == key:
            return cache[1]
        w = self._used_weight(dtype, gain)
        self._eval_cache = (key, w)
        return w

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        w = self.used_weight(x.dtype, gain)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)

    def train(self, mode: bool = True) -> 'MPConv':
        self._eval_cache = None
        return super().train(mode)

    def _apply(self, fn: Callable, recurse: bool = True) -> 'MPConv':
        self._eval_cache = None  # .to(), .half(), .cuda() may give the weight new storage
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop('_eval_cache', None)  # pickles and deep copies hold the weight only
        return state


@contextlib.contextmanager
def _forcing_off(convs: list[MPConv]) -> Iterator[None]:
    """Forced weight normalisation paused for `convs` (a checkpointed block's recomputation)."""
    for conv in convs:
        conv.forcing_off = True
    try:
        yield
    finally:
        for conv in convs:
            del conv.forcing_off


def set_checkpointing(net: torch.nn.Module, enabled: bool = True) -> int:
    """Turn activation checkpointing of every U-Net block in `net` on or off; returns the number of blocks."""
    blocks = [m for m in net.modules() if hasattr(m, '_unforced_recompute')]  # also Blocks of unpickled nets
    for block in blocks:
        block.checkpointing = enabled
    return len(blocks)


def set_channels_last(net: torch.nn.Module, enabled: bool | None) -> int:
    """Set the activation layout of every U-Net in `net` (UNet.channels_last: True, False or None for the
    default); returns the number of U-Nets."""
    unets = [m for m in net.modules() if isinstance(m, UNet)]
    for unet in unets:
        unet.channels_last = enabled
    return len(unets)


# ----------------------------------------------------------------------------
# The residual block (EDM2 Fig. 21).


@persistence.persistent_class
class Block(torch.nn.Module):
    """Resampling, a residual branch modulated by the embedding, MP-sum, optional self-attention, clipping.
    'enc' blocks change channels (1x1 conv) and pixel-normalise before the branch; 'dec' blocks feed the
    branch the block input and apply the 1x1 conv to the main path after it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = 'enc',
        resample_mode: str = 'keep',
        resample_filter: list[float] = [1, 1],
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ):
        super().__init__()
        self.out_channels, self.flavor = out_channels, flavor
        self.resample_mode, self.resample_filter = resample_mode, resample_filter
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.dropout = dropout  # probability, used in training only
        self.num_heads = (out_channels // channels_per_head) if attention else 0
        self.emb_gain = torch.nn.Parameter(torch.tensor(0.0))
        width = out_channels
        self.conv_res0 = MPConv(width if flavor == 'enc' else in_channels, width, [3, 3])
        self.emb_linear = MPConv(emb_channels, width, [])
        self.conv_res1 = MPConv(width, width, [3, 3])
        self.conv_skip = None if in_channels == width else MPConv(in_channels, width, [1, 1])
        self.attn_qkv = MPConv(width, 3 * width, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(width, width, [1, 1]) if self.num_heads else None

    def _match_channels(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.conv_skip is None else self.conv_skip(x)

    # Residual branch: conv, scale by 1 + the block's projection of the embedding, conv.
    def _residual(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale = 1 + self.emb_linear(emb, gain=self.emb_gain)
        h = mp_silu(self.conv_res0(mp_silu(x)) * scale[:, :, None, None].to(x.dtype))
        if self.training and self.dropout:
            h = torch.nn.functional.dropout(h, p=self.dropout)
        return self.conv_res1(h)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.training and getattr(self, 'checkpointing', False) and torch.is_grad_enabled():
            # Activation checkpointing: keep the block's inputs only and run it again in backward, without
            # forcing the weights a second time (already done; again would shrink them by 1 + ε).
            return torch.utils.checkpoint.checkpoint(
                self._forward, x, emb, use_reentrant=False, context_fn=self._unforced_recompute
            )
        return self._forward(x, emb)

    def _unforced_recompute(self) -> tuple:
        return contextlib.nullcontext(), _forcing_off([m for m in self.modules() if isinstance(m, MPConv)])

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        encoder = self.flavor == 'enc'
        if encoder:
            x = normalize(self._match_channels(x), dim=1)  # pixel norm
        h = self._residual(x, emb)
        x = mp_sum(x if encoder else self._match_channels(x), h, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self.attn_proj(self._attention(x)), t=self.attn_balance)
        return x if self.clip_act is None else clip(x, self.clip_act)

    # Self-attention over pixels, softmax(qᵀk / sqrt(c)) per head, with q, k, v pixel-normalised per
    # head (EDM2 Fig. 21). The qkv conv's output channels are laid out as (head, channel, q/k/v).
    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.attn_qkv(x).reshape(n, self.num_heads, c // self.num_heads, 3, h * w)
        # One copy to [n, heads, q/k/v, pixels, head channels]: the norm then runs over the innermost axis, and
        # q, k, v have contiguous rows (CPU attention over 16x16 pixels runs 3x faster than on strided ones).
        qkv = qkv.permute(0, 1, 3, 4, 2).to(attention_dtype(x), memory_format=torch.contiguous_format)
        q, k, v = normalize(qkv, dim=-1).unbind(2)
        return attention(q, k, v).mT.reshape(n, c, h, w).to(x.dtype)


# ----------------------------------------------------------------------------
# The U-Net (EDM2 Fig. 21).


def build_encoder(
    img_resolution: int,
    in_channels: int,
    level_channels: list[int],
    emb_channels: int,
    num_blocks: int,
    attn_resolutions: list[int],
    **block_kwargs,
) -> torch.nn.ModuleDict:
    """EDM2's encoder: a 3x3 MP conv from the input, then per level (a downsampling block after the first
    level and) `num_blocks` blocks; keys '{res}x{res}_conv', '_down', '_block{i}'."""
    enc = torch.nn.ModuleDict()
    channels = in_channels
    for level, width in enumerate(level_channels):
        res = img_resolution // 2**level
        if level == 0:
            enc[f'{res}x{res}_conv'] = MPConv(channels, width, kernel=[3, 3])
            channels = width
        else:
            enc[f'{res}x{res}_down'] = Block(channels, channels, emb_channels, resample_mode='down', **block_kwargs)
        for i in range(num_blocks):
            attention = res in attn_resolutions
            enc[f'{res}x{res}_block{i}'] = Block(channels, width, emb_channels, attention=attention, **block_kwargs)
            channels = width
    return enc


def run_encoder(
    enc: torch.nn.ModuleDict, x: torch.Tensor, emb: torch.Tensor, after_block: Callable | None = None
) -> list[torch.Tensor]:
    """Outputs of every encoder module in order (the U-Net's skips); after_block(name, x) -> x, if given,
    runs after each one."""
    outputs = []
    for name, block in enc.items():
        x = block(x) if name.endswith('_conv') else block(x, emb)  # the input conv takes no embedding
        if after_block is not None:
            x = after_block(name, x)
        outputs.append(x)
    return outputs


def build_decoder(
    img_resolution: int,
    level_channels: list[int],
    skip_channels: list[int],
    emb_channels: int,
    num_blocks: int,
    attn_resolutions: list[int],
    **block_kwargs,
) -> torch.nn.ModuleDict:
    """EDM2's decoder: at the lowest resolution two blocks, the first with attention; then per level an
    upsampling block (above the lowest) and num_blocks + 1 blocks, each fed MP-cat of the previous output
    and an encoder output (`skip_channels`, consumed from the end); keys '_in0', '_in1', '_up', '_block{i}'."""
    opts = dict(flavor='dec', **block_kwargs)
    skips, dec = list(skip_channels), torch.nn.ModuleDict()
    width = level_channels[-1]
    for level in reversed(range(len(level_channels))):
        res = img_resolution // 2**level
        if level == len(level_channels) - 1:
            dec[f'{res}x{res}_in0'] = Block(width, width, emb_channels, attention=True, **opts)
            dec[f'{res}x{res}_in1'] = Block(width, width, emb_channels, **opts)
        else:
            dec[f'{res}x{res}_up'] = Block(width, width, emb_channels, resample_mode='up', **opts)
        for i in range(num_blocks + 1):
            cin, width = width + skips.pop(), level_channels[level]
            dec[f'{res}x{res}_block{i}'] = Block(cin, width, emb_channels, attention=res in attn_resolutions, **opts)
    return dec


@persistence.persistent_class
class UNet(torch.nn.Module):
    """EDM2's U-Net F(x; c_noise, class_labels). Hooks: `embedding_terms` gives the terms MP-summed into the
    noise embedding in turn (weight `label_balance`; here the class label); `cond_channels` input channels,
    passed as `cond`, go after x and before the constant-ones channel; `after_block(side, name, x)` runs
    after every block. Keyword arguments of `forward` beyond `cond` go to both hooks."""

    # Activation layout: None is channels-last on CPU (oneDNN's layout: demo training 1.15x faster) and the
    # default NCHW elsewhere; True or False forces channels-last or NCHW (set_channels_last). Not a constructor
    # option: a layout changes speed, never the results beyond float rounding, and pickles stay as they were.
    channels_last: bool | None = None

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        model_channels: int = 192,
        channel_mult: list[int] = [1, 2, 3, 4],
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: list[int] = [16, 8],
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        cond_channels: int = 0,
        **block_kwargs,
    ):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb else max(widths)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = torch.nn.Parameter(torch.tensor(0.0))

        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, [])
        self.emb_label = MPConv(label_dim, emb_channels, []) if label_dim else None
        in_channels = img_channels + cond_channels + 1  # + the constant-ones channel
        self.enc = build_encoder(
            img_resolution, in_channels, widths, emb_channels, num_blocks, attn_resolutions, **block_kwargs
        )
        skip_widths = [module.out_channels for module in self.enc.values()]
        self.dec = build_decoder(
            img_resolution, widths, skip_widths, emb_channels, num_blocks, attn_resolutions, **block_kwargs
        )
        self.out_conv = MPConv(widths[0], img_channels, [3, 3])

    def embedding_terms(self, class_labels: torch.Tensor | None, **kwargs) -> list[torch.Tensor]:
        """Conditioning terms of the embedding: the class label, one-hot scaled to unit RMS."""
        if self.emb_label is None:
            return []
        return [self.emb_label(class_labels * math.sqrt(class_labels.shape[1]))]

    def after_block(self, side: str, name: str, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """Runs after the block `name` of side 'enc' or 'dec'; nothing here."""
        return x

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # Embedding: the noise term, MP-summed with each conditioning term in turn, then MP-SiLU.
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        for term in self.embedding_terms(class_labels, **kwargs):
            emb = mp_sum(emb, term, t=self.label_balance)
        emb = mp_silu(emb)

        inputs = [x] if cond is None else [x, cond.to(x.dtype)]
        x = torch.cat([*inputs, torch.ones_like(x[:, :1])], dim=1)
        if self.channels_last or (self.channels_last is None and x.device.type == 'cpu'):
            x = x.contiguous(memory_format=torch.channels_last)
        skips = run_encoder(self.enc, x, emb, lambda name, h: self.after_block('enc', name, h, **kwargs))
        x = skips[-1]
        for name, block in self.dec.items():
            x = mp_cat(x, skips.pop(), t=self.concat_balance) if '_block' in name else x
            x = self.after_block('dec', name, block(x, emb), **kwargs)
        return self.out_conv(x, gain=self.out_gain).contiguous()


# ----------------------------------------------------------------------------
# Preconditioning and learned uncertainty (EDM Table 1, EDM2 Eq. 21).


def drop_labels(labels: torch.Tensor, p: float) -> torch.Tensor:
    """One-hot labels [N, label_dim] with each row replaced by the all-zero null label with probability p
    (label dropout for classifier-free guidance, Ho & Salimans 2022)."""
    if p <= 0:
        return labels
    return labels * (torch.rand([len(labels), 1], device=labels.device) >= p)


def per_sample_sigma(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """σ as a float32 tensor [N, 1, 1, 1] for the batch x, from a scalar, [N] or [N, 1, 1, 1]."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.reshape(-1, 1, 1, 1).expand(len(x), 1, 1, 1)


def edm_coefficients(
    sigma: torch.Tensor, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1 for σ [N, 1, 1, 1]; c_noise = ln(σ)/4 has shape [N]."""
    var = sigma.square() + sigma_data**2
    return sigma_data**2 / var, sigma * sigma_data / var.sqrt(), var.rsqrt(), sigma.log().flatten() / 4


def check_use_fp16(use_fp16: bool | str) -> None:
    if use_fp16 not in (True, False, 'fp16', 'bf16'):
        raise ValueError(f"use_fp16 must be True, False, 'fp16' or 'bf16', not {use_fp16!r}")


def compute_dtype(use_fp16: bool | str, device: torch.device) -> torch.dtype:
    """The dtype a network with option `use_fp16` computes in on `device`: True or 'fp16' float16 on CUDA (EDM2's
    mode; float32 elsewhere), 'bf16' bfloat16 anywhere, False float32."""
    if use_fp16 == 'bf16':
        return torch.bfloat16
    if use_fp16 in (True, 'fp16') and device.type == 'cuda':
        return torch.float16
    return torch.float32


@persistence.persistent_class
class Precond(torch.nn.Module):
    """D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise), plus u(σ) = MP-linear(MP-Fourier(c_noise)) for the loss.

    `use_fp16`: True or 'fp16' computes F in float16 on CUDA, 'bf16' in bfloat16 (CUDA and CPU), False in
    float32. `backbone`: the class name of F if not the U-Net (e.g. 'training.networks_dit.MPDiT'), built
    with img_resolution, img_channels, label_dim and the remaining keyword arguments; F keeps the name
    `unet` in the state dict. Hooks: `make_unet` builds F; `conditioning` turns the extra inputs of
    `forward` into F's inputs and a base the denoiser works relative to. `label_dropout`: in training, each
    image's one-hot label becomes the all-zero null label with this probability (Ho & Salimans 2022), so the
    same net guides itself by the null label at sampling time (classifier-free guidance without a second net)."""

    label_dropout = 0.0  # Class default for subclasses unpickled from before the option existed.

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        use_fp16: bool | str = True,
        sigma_data: float = SIGMA_DATA,
        logvar_channels: int = 128,
        backbone: str | None = None,
        label_dropout: float = 0.0,
        **unet_kwargs,
    ):
        super().__init__()
        if not 0 <= label_dropout < 1:
            raise ValueError(f'label_dropout must be in [0, 1), not {label_dropout}')
        self.backbone, self.label_dropout = backbone, label_dropout
        check_use_fp16(use_fp16)
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_data = use_fp16, sigma_data
        self.unet = self.make_unet(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs
        )
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, [])

    def make_unet(self, **unet_kwargs) -> torch.nn.Module:
        """The network F; subclasses may register modules of their own first."""
        if self.backbone is not None:
            return dnnlib.util.construct_class_by_name(class_name=self.backbone, **unet_kwargs)
        return UNet(**unet_kwargs)

    def _compute_dtype(self, device: torch.device, force_fp32: bool) -> torch.dtype:
        return torch.float32 if force_fp32 else compute_dtype(self.use_fp16, device)

    def conditioning(
        self, x: torch.Tensor, class_labels: torch.Tensor | None, dtype: torch.dtype, **unet_kwargs
    ) -> tuple[torch.Tensor | float, dict]:
        """(base, F's keyword inputs): D is base + the preconditioned denoiser of x − base. Here base is 0
        and F gets the one-hot class labels (zeros if None; None for an unconditional net)."""
        labels = None
        if self.label_dim:
            labels = torch.zeros([len(x), self.label_dim], device=x.device) if class_labels is None else class_labels
            labels = labels.float().reshape(-1, self.label_dim)
            if self.training:
                labels = drop_labels(labels, self.label_dropout)
        return 0, dict(class_labels=labels, **unet_kwargs)

    def forward(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: torch.Tensor | None = None,
        force_fp32: bool = False,
        return_logvar: bool = False,
        **unet_kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        sigma = per_sample_sigma(sigma, x)
        dtype = self._compute_dtype(x.device, force_fp32)
        base, inputs = self.conditioning(x, class_labels, dtype, **unet_kwargs)
        x = x - base
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        F_x = self.unet((c_in * x).to(dtype), c_noise, **inputs)
        D_x = base + c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        return D_x, self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
