"""Training presets: EDM2's published configurations (EDM2 Table 2, App. B) and small CPU configurations.

A row sets command-line options (duration, batch, channels, lr, decay, dropout, P_mean, P_std, status,
snapshot, checkpoint) and may add: channel_mult, num_blocks, attn_resolutions, rampup (warm-up in Mimg),
sample_steps, synthetic (built-in data made when --data is omitted), and dataset_kwargs / network_kwargs /
loss_kwargs merged into the components' options (class_name there swaps the component itself).
"""

from dnnlib import EasyDict


def _text(**network_kwargs) -> dict:
    """Components of a text-to-image or super-resolution stage (Imagen's cascade): captions as labels,
    TextPrecond, TextEDM2Loss (which reads sigma_data from the net)."""
    return dict(
        dataset_kwargs=EasyDict(use_captions=True),
        network_kwargs=EasyDict(class_name='training.networks_text.TextPrecond', **network_kwargs),
        loss_kwargs=EasyDict(class_name='training.cascade.TextEDM2Loss'),
    )


# EDM2 paper, Table 2 / App. B: duration in images, global batch, channels, α_ref, t_ref (decay), dropout.
_IMG512 = dict(batch=2048, decay=70000, P_mean=-0.4, P_std=1.0)
_IMG64 = dict(batch=2048, decay=35000, P_mean=-0.8, P_std=1.6)


def _clip(holdout: int, **network_kwargs) -> dict:
    """Components of a CLIP-guide preset: held-out split of the data, CLIPGuide, CLIPLoss."""
    return dict(
        dataset_kwargs=EasyDict(class_name='training.clip_eval.HeldOutSplit', holdout=holdout),
        network_kwargs=EasyDict(class_name='training.clip_guide.CLIPGuide', **network_kwargs),
        loss_kwargs=EasyDict(class_name='training.clip_guide.CLIPLoss'),
    )


# DiT's recipe (Peebles & Xie 2023, Sec. 4): AdamW at a constant 1e-4, no weight decay, batch 256, 400K steps,
# DDPM formulation with learned sigma; sizes (depth, hidden, heads) of DiT Table 1, patch 2, 4 or 8. DiT's
# EMA of decay 0.9999 is replaced by power-function EMA snapshots (std 0.050 and 0.100), from which
# reconstruct_phema.py gives any other length post hoc.
_DIT_SIZES = {'s': (12, 384, 6), 'b': (12, 768, 12), 'l': (24, 1024, 16), 'xl': (28, 1152, 16)}
_DIT = dict(
    arch='dit',
    formulation='ddpm',
    batch=256,
    duration=400000 * 256,
    lr=1e-4,
    decay=0,
    rampup=0,
    dropout=0.0,
    optimizer_kwargs=EasyDict(class_name='torch.optim.AdamW', betas=(0.9, 0.999), eps=1e-8, weight_decay=0),
    ema_kwargs=EasyDict(betas=[0.9999]),  # DiT's EMA, beside the power-function EMAs of every run
)

TRAIN_PRESETS: dict[str, EasyDict] = {
    'edm2-img512-xxs': EasyDict(_IMG512, duration=2048 << 20, channels=64, lr=0.0170, dropout=0.00),
    'edm2-img512-xs': EasyDict(_IMG512, duration=2048 << 20, channels=128, lr=0.0120, dropout=0.00),
    'edm2-img512-s': EasyDict(_IMG512, duration=2048 << 20, channels=192, lr=0.0100, dropout=0.00),
    'edm2-img512-m': EasyDict(_IMG512, duration=2048 << 20, channels=256, lr=0.0090, dropout=0.10),
    'edm2-img512-l': EasyDict(_IMG512, duration=1792 << 20, channels=320, lr=0.0080, dropout=0.10),
    'edm2-img512-xl': EasyDict(_IMG512, duration=1280 << 20, channels=384, lr=0.0070, dropout=0.10),
    'edm2-img512-xxl': EasyDict(_IMG512, duration=896 << 20, channels=448, lr=0.0065, dropout=0.10),
    'edm2-img64-xs': EasyDict(_IMG64, duration=1024 << 20, channels=128, lr=0.0120, dropout=0.00),
    'edm2-img64-s': EasyDict(_IMG64, duration=1024 << 20, channels=192, lr=0.0100, dropout=0.00),
    'edm2-img64-m': EasyDict(_IMG64, duration=2048 << 20, channels=256, lr=0.0090, dropout=0.10),
    'edm2-img64-l': EasyDict(_IMG64, duration=1024 << 20, channels=320, lr=0.0080, dropout=0.10),
    'edm2-img64-xl': EasyDict(_IMG64, duration=640 << 20, channels=384, lr=0.0070, dropout=0.10),
    # Text-to-image cascade in the spirit of Diff-DALLE and Imagen: base 64, then 64->256 and 256->1024 stages,
    # smaller nets with fewer attention levels and smaller batches at higher resolution.
    'text2img-64': EasyDict(
        _IMG64, duration=1024 << 20, channels=192, lr=0.0100, dropout=0.10, **_text(text_channels=512, text_layers=6)
    ),
    'sr-64-256': EasyDict(
        _IMG64,
        batch=512,
        duration=512 << 20,
        channels=128,
        lr=0.0100,
        dropout=0.00,
        channel_mult=[1, 2, 2, 3, 4],
        num_blocks=2,
        attn_resolutions=[16],
        P_mean=-0.4,
        **_text(lowres=64, text_channels=256, text_layers=2),
    ),
    'sr-256-1024': EasyDict(
        _IMG64,
        batch=256,
        duration=256 << 20,
        channels=64,
        lr=0.0120,
        dropout=0.00,
        channel_mult=[1, 1, 2, 2, 4, 4, 8],
        num_blocks=2,
        attn_resolutions=[16],
        P_mean=-0.4,
        **_text(lowres=256, text_channels=256, text_layers=2),
    ),
    **{
        f'dit-{size}-{patch}': EasyDict(_DIT, channels=hidden, depth=depth, heads=heads, patch=patch)
        for size, (depth, hidden, heads) in _DIT_SIZES.items()
        for patch in (2, 4, 8)
    },
    # CPU presets on the built-in 32x32 shapes data (made on first use when --data is omitted).
    # Short warm-up and decay so that under a hundred thousand images suffice; pixel-space noise levels. A high
    # α_ref for so few steps: at 20Ki images the demo's loss was -0.47 / -0.74 / -0.88 with 0.01 / 0.02 / 0.03.
    # The demo's noise levels sit higher than EDM2's (P_mean 0.4, not -0.8), where the number, place and size of
    # the object are decided, and it drops 10 % of labels to guide itself: one clean shape of the requested class
    # in 15 of 40 samples at guidance 2 instead of 7 of 40 at 72Ki images, at 144Ki in 179-183 of 200 with the
    # churn of the `demo` generation preset, and at 192Ki (8 min 41 s on 2 cores, bf16) in 192 of 200
    # (docs/benchmarks.md).
    'demo': EasyDict(
        duration=192 << 10,
        batch=64,
        channels=16,
        lr=0.0300,
        decay=500,
        dropout=0.00,
        P_mean=0.4,
        P_std=1.4,
        label_dropout=0.1,
        rampup=0.005,
        channel_mult=[1, 2, 4],
        num_blocks=1,
        attn_resolutions=[8],
        status=4 << 10,
        snapshot=16 << 10,
        checkpoint=16 << 10,
        synthetic=EasyDict(resolution=32, num_images=10000),
        sample_steps=24,
    ),
    'demo-tiny': EasyDict(
        duration=2 << 10,
        batch=16,
        channels=16,
        lr=0.0100,
        decay=100,
        dropout=0.00,
        P_mean=-0.8,
        P_std=1.6,
        rampup=0.001,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
        status=1 << 10,
        snapshot=1 << 10,
        checkpoint=1 << 10,
        synthetic=EasyDict(resolution=16, num_images=256),
        sample_steps=8,
    ),
    # MP-DiT under EDM2's preconditioning and loss on the 16x16 shapes: 64 tokens of 2x2 patches, width 128,
    # 4 blocks, 384Ki images (11 min 39 s on 2 cores of an AMD EPYC). Without the depthwise convolution in its MLPs
    # it drew blobs of the right colours (one clean shape of the requested class in 40 of 200 samples); with it,
    # higher noise levels (P_mean 0.8) and the learning rate held 4x longer: 181 of 200 at 320Ki on a Xeon, 172
    # at 320Ki and 182 at 384Ki on the EPYC (guidance 2, churn 20; docs/benchmarks.md).
    'demo-dit': EasyDict(
        arch='mp-dit',
        formulation='edm',
        duration=384 << 10,
        batch=64,
        channels=128,
        depth=4,
        heads=2,
        patch=2,
        conv_mlp=True,
        lr=0.0300,
        decay=2000,
        dropout=0.00,
        P_mean=0.8,
        P_std=1.4,
        label_dropout=0.1,
        rampup=0.005,
        status=4 << 10,
        snapshot=16 << 10,
        checkpoint=16 << 10,
        synthetic=EasyDict(resolution=16, num_images=10000),
        sample_steps=24,
    ),
    # Text-to-image demo cascade on the built-in captioned shapes: base 16x16, then 16->32 (no text needed).
    # 288Ki images: at 128Ki the shape word was followed by 85 % of samples (guidance 3), at 192Ki by 92-94 %, at
    # 288Ki by 96 % (and at guidance 1 by 81 % against 69-73 %; docs/text_adherence.md).
    'demo-text': EasyDict(
        duration=288 << 10,
        batch=64,
        channels=16,
        lr=0.0300,
        decay=600,
        dropout=0.00,
        P_mean=-0.8,
        P_std=1.6,
        rampup=0.005,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
        status=8 << 10,
        snapshot=32 << 10,
        checkpoint=32 << 10,
        synthetic=EasyDict(resolution=16, num_images=10000),
        sample_steps=24,
        **_text(text_channels=64, text_layers=1, channels_per_head=32, text_tokens='words'),
    ),
    # demo-text with demo-dit's transformer in place of the U-Net (TextMPDiT: cross-attention after every block).
    'demo-text-dit': EasyDict(
        arch='mp-dit',
        duration=128 << 10,
        batch=64,
        channels=128,
        depth=4,
        heads=2,
        patch=2,
        lr=0.0300,
        decay=600,
        dropout=0.00,
        P_mean=-0.8,
        P_std=1.6,
        rampup=0.005,
        status=8 << 10,
        snapshot=32 << 10,
        checkpoint=32 << 10,
        synthetic=EasyDict(resolution=16, num_images=10000),
        sample_steps=24,
        **_text(text_channels=64, text_layers=1, channels_per_head=64, text_tokens='words'),
    ),
    # demo-sr denoises the detail over the bicubic image: std 0.06, 0.125 with the training degradations.
    'demo-sr': EasyDict(
        duration=64 << 10,
        batch=32,
        channels=16,
        lr=0.0100,
        decay=600,
        dropout=0.00,
        P_mean=-2.6,
        P_std=1.5,
        rampup=0.005,
        channel_mult=[1, 2, 2],
        num_blocks=1,
        attn_resolutions=[8],
        status=8 << 10,
        snapshot=32 << 10,
        checkpoint=32 << 10,
        synthetic=EasyDict(resolution=32, num_images=10000),
        sample_steps=16,
        **_text(lowres=16, text_channels=0, residual=True, sigma_data=0.1),
    ),
    # Noise-aware CLIP guides (GLIDE, Nichol et al. 2021): training/clip_guide.py; σ drawn as for the denoiser of the same data.
    'clip-img64': EasyDict(
        _IMG64,
        duration=256 << 20,
        channels=128,
        lr=0.0060,
        dropout=0.00,
        num_blocks=2,
        channel_mult=[1, 2, 3, 4],
        attn_resolutions=[16, 8],
        **_clip(holdout=10000, embed_dim=512, text_channels=512, text_layers=6),
    ),
    'demo-clip': EasyDict(
        duration=80 << 10,
        batch=64,
        channels=32,
        lr=0.0100,
        decay=400,
        dropout=0.00,
        P_mean=-0.8,
        P_std=1.6,
        rampup=0.002,
        channel_mult=[1, 2, 2],
        num_blocks=1,
        attn_resolutions=[8],
        status=8 << 10,
        snapshot=40 << 10,
        checkpoint=40 << 10,
        synthetic=EasyDict(resolution=16, num_images=4096),
        **_clip(holdout=256, embed_dim=64, text_channels=64, text_layers=2, channels_per_head=32),
    ),
}
