"""Count the forward-pass Gflops per image of an EDM2 network or a DiT: a pickle, a DiT checkpoint, a DiT size
(DiT-XL/2), a training preset or a generation preset.

Convention, chosen because it reproduces EDM2's published Gflops (Table 2: XS 46, S 102, M 181, L 282,
XL 406, XXL 552 for 64x64x4 latents and 1000 classes): a multiply-add counts as ONE flop in convolutions,
matrix products and attention (torch's FlopCounterMode counts it as two, so its total is halved); on top,
every pointwise op counts one flop per output element and every reduction one per input element. The
latter include the weight normalisation that MP layers redo on every call, which grows with the number of
weights. Measured: XS 45.68 (-0.7%), S 102.38, M 181.65, L 283.49, XL 407.90, XXL 554.88 (all within 1%);
multiply-adds alone give XS 44.95 (-2.3%) and undercount every size by about 1%.

The network runs once on the meta device (shapes only, no memory, no arithmetic), so even XXL counts in a
few seconds. Training presets build the net the way train_edm2.py would for the preset's data: 64x64x4
latents (edm2-img512-*) or 64x64x3 pixels (edm2-img64-*) with 1000 classes, the demo presets' shapes data.
Generation presets count their published networks (and guiding networks) without downloading them: the
file name names the architecture (size, img512/img64, uncond).

DiT (Peebles & Xie 2023, Table 4) counts multiply-adds alone, one flop each; that count is printed beside the
total. Measured for 256x256 images (32x32x4 latents, 1000 classes): S/2 6.06, B/2 23.01, L/2 80.70, XL/2 118.62
(published 6.06, 23.01, 80.71, 118.64); with elementwise work 6.07, 23.04, 80.79, 118.74. A discrete-time net
(VPDenoiser) counts its backbone's evaluation. Parameters are counted as the backbone's state dict holds them,
DiT's fixed position embedding included, as DiT counts it (XL/2: 675.1M).
"""

import os
import re
from collections.abc import Callable
from typing import Any

import click
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import dnnlib
from training import shapes
from training.dit_release import dit_network, is_dit_checkpoint
from training.network_loading import load_network, resolve_network_path
from training.networks_dit import DIT_CONFIGS, DiT
from training.presets_generate import presets as GENERATE_PRESETS
from training.presets_train import TRAIN_PRESETS
from training.run_config import backbone_kwargs
from training.snapshots import TRUST_HELP, NetworkPickleError, load_network_pickle, trust_pickles
from training.user_errors import plain_warnings

# Data the non-demo training presets are meant for: (resolution, channels, classes) of what the network sees.
PRESET_DATA = {
    'edm2-img512': (64, 4, 1000),
    'edm2-img64': (64, 3, 1000),
    'dit': (32, 4, 1000),
    'text2img-64': (64, 3, 0),
    'sr-64-256': (256, 3, 0),
    'sr-256-1024': (1024, 3, 0),
}


class _ElementwiseCounter(TorchDispatchMode):
    """One flop per output element of a pointwise op, one per input element of a reduction."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.Tag.pointwise in func.tags and func.overloadpacket is not torch.ops.aten.clone:
            self.flops += sum(t.numel() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        elif torch.Tag.reduction in func.tags:
            self.flops += args[0].numel()
        return out


def count_ops(fn: Callable[[], Any], elementwise: bool = True) -> int:
    """Flops of calling `fn()`: multiply-adds of convolutions, matmuls and attention as one each, plus (unless
    `elementwise` is False) pointwise ops by output elements and reductions by input elements."""
    with torch.no_grad(), FlopCounterMode(display=False) as matmuls, _ElementwiseCounter() as others:
        fn()
    return matmuls.get_total_flops() // 2 + (others.flops if elementwise else 0)


def count_flops(net: torch.nn.Module, elementwise: bool = True) -> int:
    """Flops of one denoiser evaluation D(x; sigma) for one image, counted on the meta device; for a discrete-time
    net (a VPDenoiser's `.net`), one evaluation of its backbone at a timestep."""
    net = net.eval().requires_grad_(False).to('meta')
    x = torch.zeros([1, net.img_channels, net.img_resolution, net.img_resolution], device='meta')
    sigma = torch.ones([1], device='meta')
    labels = torch.zeros([1, net.label_dim], device='meta') if net.label_dim else None
    forward = net.net if hasattr(net, 'diffusion') and hasattr(net, 'net') else net
    lowres = getattr(net, 'lowres', None)  # A super-resolution stage also reads its low-res input.
    extra = dict(lowres=torch.zeros([1, net.img_channels, lowres, lowres], device='meta')) if lowres else {}
    return count_ops(lambda: forward(x, sigma, labels, **extra), elementwise)


def count_parameters(net: torch.nn.Module) -> int:
    """Numbers in the backbone's state dict: weights and fixed tables such as DiT's position embedding."""
    backbone = net.net if hasattr(net, 'diffusion') and hasattr(net, 'net') else net
    return sum(value.numel() for value in backbone.state_dict().values())


def build_dit(config: str, input_size: int = 32) -> torch.nn.Module:
    """A DiT of Table 1's sizes (DiT-XL/2 ...) on DiT's DDPM process, on the meta device; 32x32 latents = 256 px."""
    with torch.device('meta'):
        dit = DiT(input_size=input_size, **DIT_CONFIGS[config])
    return dit_network(dit)


def build_train_preset_net(preset: str, label_dim: int | None = None) -> torch.nn.Module:
    """The network train_edm2.py builds for a training preset and its intended data, on the meta device."""
    p = TRAIN_PRESETS[preset]
    if 'synthetic' in p:
        resolution, channels, classes = p.synthetic.resolution, 3, len(shapes.SHAPES)
    else:
        data = [shape for prefix, shape in PRESET_DATA.items() if preset == prefix or preset.startswith(prefix + '-')]
        resolution, channels, classes = data[0] if data else (64, 3, 0)
    network_kwargs, _loss_kwargs = backbone_kwargs(p, resolution, precision=False)
    if network_kwargs.class_name.endswith('.CLIPGuide'):
        raise click.ClickException(f'{preset}: count_flops counts denoisers; this preset trains a CLIP guide.')
    if network_kwargs.class_name.endswith('.TextPrecond'):
        classes = 0
    with torch.device('meta'):
        return dnnlib.util.construct_class_by_name(
            img_resolution=resolution,
            img_channels=channels,
            label_dim=classes if label_dim is None else label_dim,
            **network_kwargs,
        )


def build_published_net(url: str) -> torch.nn.Module:
    """The architecture of a published EDM2 pickle or DiT checkpoint, read from its name (edm2-{dataset}-{size}
    [-uncond]-..., DiT-{size}-{patch}-{res}x{res}.pt)."""
    dit = re.search(r'DiT-(S|B|L|XL)-(2|4|8)-(\d+)x\d+\.pt$', url)
    if dit is not None:
        return build_dit(f'DiT-{dit.group(1)}/{dit.group(2)}', int(dit.group(3)) // 8)
    match = re.search(r'(edm2-img(?:512|64)-[a-z]+)(-uncond)?-\d+-[\d.]+\.pkl$', url)
    if match is None or match.group(1) not in TRAIN_PRESETS:
        raise click.ClickException(
            f'{url}: not an EDM2 network name (edm2-DATASET-SIZE-KIMG-STD.pkl); pass the pickle itself'
        )
    return build_train_preset_net(match.group(1), label_dim=0 if match.group(2) else None)


def load_pickled_net(path: str) -> torch.nn.Module:
    """The network in a pickle, or in the newest snapshot of a run folder."""
    try:
        path = resolve_network_path(path)
        net = load_network_pickle(path)['ema']
    except (NetworkPickleError, OSError) as e:
        raise click.ClickException(re.sub(r'\s+', ' ', str(e))) from None
    if not isinstance(net, torch.nn.Module) or not all(
        hasattr(net, k) for k in ('img_resolution', 'img_channels', 'label_dim')
    ):
        raise click.ClickException(f"{path}: its 'ema' entry is a {type(net).__name__}, not an EDM2 network")
    if hasattr(net, 'encode_image'):
        raise click.ClickException(f'{path}: count_flops counts denoisers; this is a CLIP guide.')
    return net


def resolve(pkl_or_preset: str) -> list[tuple[str, torch.nn.Module]]:
    """(role, network) pairs to count for a pickle path, a training preset or a generation preset."""
    if pkl_or_preset in TRAIN_PRESETS:
        return [('net', build_train_preset_net(pkl_or_preset))]
    if pkl_or_preset in DIT_CONFIGS:
        return [('net', build_dit(pkl_or_preset))]
    if is_dit_checkpoint(pkl_or_preset):
        try:
            return [('net', load_network(pkl_or_preset, torch.device('cpu'))[0])]
        except (NetworkPickleError, OSError) as e:
            raise click.ClickException(str(e)) from None
    if pkl_or_preset in GENERATE_PRESETS:
        preset = GENERATE_PRESETS[pkl_or_preset]
        refs = [('net', preset.net)] + ([('gnet', preset.gnet)] if preset.gnet else [])
        return [(role, build_published_net(ref) if '://' in ref else load_pickled_net(ref)) for role, ref in refs]
    if pkl_or_preset.endswith('.pkl') or os.path.exists(pkl_or_preset):
        return [('net', load_pickled_net(pkl_or_preset))]
    raise click.ClickException(
        f'{pkl_or_preset}: no such pickle, checkpoint, run folder or preset; pass a training preset '
        f'({", ".join(TRAIN_PRESETS)}), a DiT size (DiT-XL/2) or a generation preset of generate_images.py'
    )


@click.command()
@click.argument('pkl_or_preset', metavar='PKL_OR_PRESET')
@click.option('--trust-pickles', is_flag=True, callback=trust_pickles, expose_value=False, help=TRUST_HELP)
def main(pkl_or_preset: str) -> None:
    """Print the forward-pass Gflops per image of a network (pickle, .safetensors, run folder or DiT checkpoint),
    a training preset, a generation preset or a DiT size.

    \b
    python count_flops.py edm2-img512-xs                 # training preset: 45.68 Gflops
    python count_flops.py edm2-img512-s-autog-fid        # generation preset: net and guiding net
    python count_flops.py runs/demo/network-snapshot-0000196-0.100.pkl
    python count_flops.py DiT-XL/2                       # 118.74 Gflops; multiply-adds alone 118.62
    python count_flops.py dit-xl2-512                    # DiT's released 512x512 model
    """
    for role, net in resolve(pkl_or_preset):
        shape = f'{net.img_channels}x{net.img_resolution}x{net.img_resolution}'
        click.echo(
            f'{role}: {dnnlib.util.format_figure(count_flops(net) / 1e9)} Gflops per image, '
            f'{dnnlib.util.format_figure(count_flops(net, False) / 1e9)} in '
            f'multiply-adds alone ({shape}, {net.label_dim} classes, {count_parameters(net) / 1e6:.1f}M parameters)'
        )


if __name__ == '__main__':
    plain_warnings()
    main()
