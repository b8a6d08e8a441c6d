"""Count the forward-pass Gflops per image of an EDM2 network: a pickle, a training preset or a generation preset.

Convention, chosen because it reproduces EDM2's published Gflops (Table 2: XS 46, S 102, M 181, L 282,
XL 406, XXL 552 for 64x64x4 latents and 1000 classes): a multiply-add counts as ONE flop in convolutions,
matrix products and attention (torch's FlopCounterMode counts it as two, so its total is halved); on top,
every pointwise op counts one flop per output element and every reduction one per input element. The
latter include the weight normalisation that MP layers redo on every call, which grows with the number of
weights. Measured: XS 45.55 (-1.0%), S 102.09, M 181.14, L 282.70, XL 406.77, XXL 553.35 (all within 1%);
multiply-adds alone give XS 44.95 (-2.3%) and undercount every size by about 1%.

The network runs once on the meta device (shapes only, no memory, no arithmetic), so even XXL counts in a
few seconds. Training presets build the net the way train_edm2.py would for the preset's data: 64x64x4
latents (edm2-img512-*) or 64x64x3 pixels (edm2-img64-*) with 1000 classes, the demo presets' shapes data.
Generation presets count their published networks (and guiding networks) without downloading them: the
file name names the architecture (size, img512/img64, uncond).
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
from training.generation import resolve_network_path
from training.presets_generate import presets as GENERATE_PRESETS
from training.presets_train import TRAIN_PRESETS
from training.snapshots import NetworkPickleError, load_network_pickle

# Data the training presets are meant for: (resolution, channels, classes) of what the network sees.
PRESET_DATA = {'edm2-img512': (64, 4, 1000), 'edm2-img64': (64, 3, 1000)}


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


def count_ops(fn: Callable[[], Any]) -> int:
    """Flops of calling `fn()`: multiply-adds of convolutions, matmuls and attention as one each, plus
    pointwise ops by output elements and reductions by input elements."""
    with torch.no_grad(), FlopCounterMode(display=False) as matmuls, _ElementwiseCounter() as elementwise:
        fn()
    return matmuls.get_total_flops() // 2 + elementwise.flops


def count_flops(net: torch.nn.Module) -> int:
    """Flops of one denoiser evaluation D(x; sigma) for one image, counted on the meta device."""
    net = net.eval().requires_grad_(False).to('meta')
    x = torch.zeros([1, net.img_channels, net.img_resolution, net.img_resolution], device='meta')
    sigma = torch.ones([1], device='meta')
    labels = torch.zeros([1, net.label_dim], device='meta') if net.label_dim else None
    return count_ops(lambda: net(x, sigma, labels))


def build_train_preset_net(preset: str, label_dim: int | None = None) -> torch.nn.Module:
    """The network train_edm2.py builds for a training preset and its intended data, on the meta device."""
    p = TRAIN_PRESETS[preset]
    if 'synthetic' in p:
        resolution, channels, classes = p.synthetic.resolution, 3, len(shapes.SHAPES)
    else:
        resolution, channels, classes = PRESET_DATA[preset.rsplit('-', 1)[0]]
    kwargs = {key: p[key] for key in ('channel_mult', 'num_blocks', 'attn_resolutions') if key in p}
    with torch.device('meta'):
        return dnnlib.util.construct_class_by_name(
            class_name='training.networks_edm2.Precond',
            img_resolution=resolution,
            img_channels=channels,
            label_dim=classes if label_dim is None else label_dim,
            model_channels=p.channels,
            dropout=p.get('dropout', 0.0),
            use_fp16=False,
            **kwargs,
        )


def build_published_net(url: str) -> torch.nn.Module:
    """The architecture of a published EDM2 pickle, read from its name (edm2-{dataset}-{size}[-uncond]-...)."""
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
    return net


def resolve(pkl_or_preset: str) -> list[tuple[str, torch.nn.Module]]:
    """(role, network) pairs to count for a pickle path, a training preset or a generation preset."""
    if pkl_or_preset in TRAIN_PRESETS:
        return [('net', build_train_preset_net(pkl_or_preset))]
    if pkl_or_preset in GENERATE_PRESETS:
        preset = GENERATE_PRESETS[pkl_or_preset]
        refs = [('net', preset.net)] + ([('gnet', preset.gnet)] if preset.gnet else [])
        return [(role, build_published_net(ref) if '://' in ref else load_pickled_net(ref)) for role, ref in refs]
    if pkl_or_preset.endswith('.pkl') or os.path.exists(pkl_or_preset):
        return [('net', load_pickled_net(pkl_or_preset))]
    raise click.ClickException(
        f'{pkl_or_preset}: no such pickle, run folder or preset; pass a training preset '
        f'({", ".join(TRAIN_PRESETS)}) or a generation preset of generate_images.py'
    )


@click.command()
@click.argument('pkl_or_preset', metavar='PKL_OR_PRESET')
def main(pkl_or_preset: str) -> None:
    """Print the forward-pass Gflops per image of a network pickle, training preset or generation preset.

    \b
    python count_flops.py edm2-img512-xs                 # training preset: 45.55 Gflops
    python count_flops.py edm2-img512-s-autog-fid        # generation preset: net and guiding net
    python count_flops.py runs/demo/network-snapshot-0000384-0.100.pkl
    """
    for role, net in resolve(pkl_or_preset):
        num_params = sum(p.numel() for p in net.parameters())
        shape = f'{net.img_channels}x{net.img_resolution}x{net.img_resolution}'
        click.echo(
            f'{role}: {count_flops(net) / 1e9:.2f} Gflops per image '
            f'({shape}, {net.label_dim} classes, {num_params / 1e6:.1f}M parameters)'
        )


if __name__ == '__main__':
    main()
