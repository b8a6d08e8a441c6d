"""One backbone, two formulations: the network and loss options of an (architecture, formulation) pair,
and the adapters that give each backbone the call signature its formulation expects.

Architectures: 'unet' (EDM2's MP U-Net), 'dit' (DiT, Peebles & Xie 2023), 'mp-dit' (DiT built from EDM2's
magnitude-preserving layers). Formulations:
- 'edm': D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise) with EDM2's loss (EDM Table 1, EDM2 Eq. 21). F is
  called as F(x, c_noise, class_labels) with c_noise = ln(σ)/4; the U-Net and MP-DiT take that directly,
  DiT through `DiTBackbone`.
- 'ddpm': a net(x_t, t, labels) trained on a discrete VP process (Ho et al. 2020, Alg. 1), t the original
  timestep index. DiT takes that directly (learned-range variance, as DiT trains); the U-Net and MP-DiT
  through `VPBackbone`, predicting ε with a fixed variance.
"""

import numpy as np
import torch

import dnnlib
from torch_utils import persistence
from training.networks_dit import DiT, autocast_to
from training.networks_edm2 import check_use_fp16, compute_dtype, drop_labels
from training.vp_diffusion import beta_schedule

ARCHS = ('unet', 'dit', 'mp-dit')
FORMULATIONS = ('edm', 'ddpm')
_BACKBONES = {'unet': 'training.networks_edm2.UNet', 'mp-dit': 'training.networks_dit.MPDiT'}
TEXT_BACKBONES = {'mp-dit': 'training.networks_dit_text.TextMPDiT'}  # Backbones of TextPrecond beside its U-Net.

# DiT's timestep input under EDM: t = DIT_TIMESTEP_SCALE·c_noise = 250·ln σ. DiT's frequency features were
# made for t in [0, 1000); this maps EDM's range σ ∈ [0.002, 80] to t ∈ [−1550, 1100], a span of the
# same order, so the low frequencies still resolve noise levels (EDM's VP nets likewise got 1000·t).
DIT_TIMESTEP_SCALE = 1000.0


class BackboneError(ValueError):
    """An architecture, formulation or transformer geometry that cannot be built."""


@persistence.persistent_class
class DiTBackbone(torch.nn.Module):
    """DiT as EDM's F(x; c_noise, class_labels): timestep t = 1000·c_noise, one-hot labels (None or an
    all-zero row: DiT's null label), no learned variance (EDM2's loss learns its own uncertainty). Computes in
    the dtype of x, which Precond's use_fp16 sets (autocast_to). DiT's own class dropout is off: under EDM,
    Precond's label_dropout is the one that replaces labels by the null label."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, **dit_kwargs) -> None:
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.dit = DiT(
            input_size=img_resolution,
            in_channels=img_channels,
            num_classes=label_dim,
            learn_sigma=False,
            class_dropout_prob=0,
            **dit_kwargs,
        )

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        with autocast_to(x.dtype, x.device):
            return self.dit(x, noise_labels.to(torch.float32) * DIT_TIMESTEP_SCALE, class_labels).to(x.dtype)


@persistence.persistent_class
class VPDiT(DiT):
    """DiT for the DDPM formulation, built from the data's geometry: ε and the variance value v (learned
    sigma), as DiT is trained; parameter names are DiT's. `use_fp16` is DiT's compute precision, here a
    constructor option as for Precond."""

    def __init__(
        self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool | str = False, **dit_kwargs
    ) -> None:
        check_use_fp16(use_fp16)
        dit_kwargs.setdefault('learn_sigma', True)
        super().__init__(input_size=img_resolution, in_channels=img_channels, num_classes=label_dim, **dit_kwargs)
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = use_fp16


# ln σ_t of a β schedule at a (fractional) original timestep t, interpolated linearly between steps; the
# inverse of VPDiffusion.timestep_of_sigma, so that VPDenoiser's c_noise maps back to the σ it came from.
def schedule_log_sigma(t: torch.Tensor, schedule: str = 'linear', num_timesteps: int = 1000) -> torch.Tensor:
    alphas_cumprod = np.cumprod(1 - beta_schedule(schedule, num_timesteps))
    table = torch.tensor(0.5 * np.log((1 - alphas_cumprod) / alphas_cumprod), device=t.device)
    t = t.to(torch.float64).clamp(0, num_timesteps - 1)
    lo = t.floor().long().clamp(max=max(num_timesteps - 2, 0))
    hi = (lo + 1).clamp(max=num_timesteps - 1)
    return table[lo] + (t - lo) * (table[hi] - table[lo])


@persistence.persistent_class
class VPBackbone(torch.nn.Module):
    """An EDM-signature backbone F(x; c_noise, class_labels) as a DDPM net(x_t, t, labels) predicting ε:
    F gets x_t as it is (unit variance under a VP process, so c_in = 1) and c_noise = ln(σ_t)/4, EDM's
    noise label (EDM Table 1) of the timestep's σ_t = √((1 − ᾱ_t)/ᾱ_t). F computes in the dtype that `use_fp16`
    gives, as under Precond (EDM2's layers take it from their input); the output is float32.

    `label_dropout`: in training, each image's one-hot label becomes the all-zero null label with this
    probability (DiT's class dropout, Ho & Salimans 2022), so that the null label guides at sampling time."""

    use_fp16 = False  # Class default for nets unpickled from before the option existed.

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        backbone: str = _BACKBONES['unet'],
        schedule: str = 'linear',
        num_timesteps: int = 1000,
        label_dropout: float = 0.0,
        use_fp16: bool | str = False,
        **backbone_kwargs,
    ) -> None:
        super().__init__()
        check_use_fp16(use_fp16)
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.schedule, self.num_timesteps, self.label_dropout = schedule, num_timesteps, label_dropout
        self.use_fp16 = use_fp16
        self.net = dnnlib.util.construct_class_by_name(
            class_name=backbone,
            img_resolution=img_resolution,
            img_channels=img_channels,
            label_dim=label_dim,
            **backbone_kwargs,
        )

    def noise_labels(self, t: torch.Tensor) -> torch.Tensor:
        return schedule_log_sigma(t.reshape(-1), self.schedule, self.num_timesteps).to(torch.float32) / 4

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(compute_dtype(self.use_fp16, x.device))
        labels = None
        if self.label_dim:
            labels = torch.zeros([len(x), self.label_dim], device=x.device) if class_labels is None else class_labels
            labels = labels.to(torch.float32).reshape(-1, self.label_dim)
            if self.training:
                labels = drop_labels(labels, self.label_dropout)
        return self.net(x, self.noise_labels(t).expand(len(x)), labels).to(torch.float32)


def build_kwargs(
    arch: str,
    formulation: str,
    resolution: int,
    unet_kwargs: dict,
    transformer_kwargs: dict,
    use_fp16: bool | str = True,
    label_dropout: float | None = None,
) -> tuple[dnnlib.EasyDict, dnnlib.EasyDict]:
    """(network_kwargs, loss_kwargs) of training_loop for an architecture and formulation. unet_kwargs are
    the U-Net's options (model_channels, dropout, ...); transformer_kwargs DiT's and MP-DiT's (patch_size,
    hidden_size, depth, num_heads; MP-DiT also dropout and conv_mlp). resolution is checked against the patch size.
    label_dropout: the share of class labels replaced by the null label in training (None: 0 for edm, DiT's
    0.1 for ddpm); under ddpm, DiT takes it as its own class_dropout_prob."""
    if arch not in ARCHS:
        raise BackboneError(f'Unknown architecture {arch!r}; choose one of {", ".join(ARCHS)}.')
    if formulation not in FORMULATIONS:
        raise BackboneError(f'Unknown formulation {formulation!r}; choose one of {", ".join(FORMULATIONS)}.')
    if transformer_kwargs.get('conv_mlp') and arch != 'mp-dit':
        raise BackboneError('--conv-mlp applies to --arch=mp-dit, the magnitude-preserving transformer.')
    kwargs = dnnlib.EasyDict(unet_kwargs if arch == 'unet' else transformer_kwargs)
    if arch != 'unet':
        patch, hidden, heads = kwargs.get('patch_size', 2), kwargs.get('hidden_size', 384), kwargs.get('num_heads', 6)
        if patch < 1 or resolution % patch:
            raise BackboneError(f'--patch={patch} does not divide the resolution {resolution}; choose a divisor.')
        if hidden % heads or hidden % 4:
            raise BackboneError(f'Transformer width {hidden} must be a multiple of 4 and of its {heads} heads.')
    if arch == 'dit':
        kwargs.pop('dropout', None)  # DiT has no dropout (its label dropout is class_dropout_prob)
    if formulation == 'edm':
        net = dnnlib.EasyDict(class_name='training.networks_edm2.Precond', use_fp16=use_fp16, **kwargs)
        if arch != 'unet':
            net.backbone = 'training.backbones.DiTBackbone' if arch == 'dit' else _BACKBONES[arch]
        if label_dropout:
            net.label_dropout = label_dropout
        return net, dnnlib.EasyDict(class_name='training.loss.EDM2Loss')
    loss = dnnlib.EasyDict(class_name='training.vp_diffusion.VPLoss', schedule='linear', num_timesteps=1000)
    if arch == 'dit':
        net = dnnlib.EasyDict(class_name='training.backbones.VPDiT', use_fp16=use_fp16, **kwargs)
        if label_dropout is not None:
            net.class_dropout_prob = label_dropout  # Else DiT's default, 0.1.
        return net, dnnlib.EasyDict(loss, variance='learned_range')
    net = dnnlib.EasyDict(
        class_name='training.backbones.VPBackbone', backbone=_BACKBONES[arch], use_fp16=use_fp16, **kwargs
    )
    net.label_dropout = 0.1 if label_dropout is None else label_dropout  # DiT's rate: the null label guides.
    return net, dnnlib.EasyDict(loss, variance='fixed_small')


def preset_kwargs(p: dict, resolution: int, use_fp16: bool | str = True) -> tuple[dnnlib.EasyDict, dnnlib.EasyDict]:
    """build_kwargs for a train_edm2 preset row (with its command-line overrides): `arch` and `formulation`
    (default unet, edm); the U-Net's channels, dropout, channel_mult, num_blocks, attn_resolutions; a
    transformer's width `channels`, `patch` (2), `depth` (12) and `heads` (width / 64); MP-DiT's `conv_mlp`;
    `label_dropout`."""
    unet = dict(model_channels=p['channels'], dropout=p.get('dropout', 0.0))
    unet.update({key: p[key] for key in ('channel_mult', 'num_blocks', 'attn_resolutions') if key in p})
    transformer = dict(
        patch_size=p.get('patch', 2),
        hidden_size=p['channels'],
        depth=p.get('depth', 12),
        num_heads=p.get('heads', max(p['channels'] // 64, 1)),
        dropout=p.get('dropout', 0.0),
    )
    if p.get('conv_mlp'):
        transformer.update(conv_mlp=True)
    return build_kwargs(
        p.get('arch', 'unet'),
        p.get('formulation', 'edm'),
        resolution,
        unet,
        transformer,
        use_fp16,
        p.get('label_dropout'),
    )
