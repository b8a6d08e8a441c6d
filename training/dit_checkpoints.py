"""DiT's released checkpoints as state dicts: the native layout of `DiT-XL-2-256x256.pt` and
`DiT-XL-2-512x512.pt` (Peebles & Xie 2023), training checkpoints holding an 'ema' entry, and diffusers'
`DiTTransformer2DModel` layout; `load_dit_checkpoint` infers the geometry and builds the matching DiT."""

import argparse
import math
import pickle
import re

import torch

from training.checkpoint import is_training_state
from training.networks_dit import DIT_CONFIGS, DiT, sincos_pos_embed


class DiTCheckpointError(ValueError):
    """A state dict that is not a DiT checkpoint, or one whose weights contradict each other."""


def infer_dit_kwargs(state: dict) -> dict:
    """DiT constructor arguments that a state dict in the released layout was made with."""
    required = ['x_embedder.proj.weight', 'pos_embed', 'y_embedder.embedding_table.weight', 'final_layer.linear.weight']
    missing = [key for key in required if key not in state]
    if len(missing) == len(required):
        raise DiTCheckpointError(f'Not a DiT checkpoint: none of the keys {", ".join(required)} is present.')
    if missing:
        raise DiTCheckpointError(f'Incomplete DiT checkpoint: key {missing[0]} is missing.')
    hidden, in_channels, patch, _ = state['x_embedder.proj.weight'].shape
    grid = math.isqrt(state['pos_embed'].shape[1])
    depth = sum(1 for key in state if key.startswith('blocks.') and key.endswith('.attn.qkv.weight'))
    out_channels = state['final_layer.linear.weight'].shape[0] // patch**2
    if out_channels not in (in_channels, 2 * in_channels) or grid**2 != state['pos_embed'].shape[1]:
        raise DiTCheckpointError('Inconsistent DiT checkpoint: pos_embed or final_layer.linear has an odd shape.')
    known_heads = {(cfg['depth'], cfg['hidden_size']): cfg['num_heads'] for cfg in DIT_CONFIGS.values()}
    fc1 = state.get('blocks.0.mlp.fc1.weight')
    mlp_hidden = 4 * hidden if fc1 is None else fc1.shape[0]  # a missing key is reported by the strict load
    return dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=known_heads.get((depth, hidden), max(hidden // 64, 1)),
        mlp_ratio=mlp_hidden / hidden,
        num_classes=state['y_embedder.embedding_table.weight'].shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels,
    )


# diffusers' DiTTransformer2DModel stores the same weights under other names, q, k and v apart, a copy
# of the conditioning embedders in every block, and no position embedding.
_DIFFUSERS_NAMES = {
    'pos_embed.proj': 'x_embedder.proj',
    'emb.timestep_embedder.linear_1': 't_embedder.mlp.0',
    'emb.timestep_embedder.linear_2': 't_embedder.mlp.2',
    'emb.class_embedder.embedding_table': 'y_embedder.embedding_table',
    'proj_out_1': 'final_layer.adaLN_modulation.1',
    'proj_out_2': 'final_layer.linear',
    'norm1.linear': 'adaLN_modulation.1',
    'attn1.to_out.0': 'attn.proj',
    'ff.net.0.proj': 'mlp.fc1',
    'ff.net.2': 'mlp.fc2',
}


def dit_state_dict_from_diffusers(state: dict, input_size: int) -> dict:
    """The DiT layout of a diffusers DiTTransformer2DModel state dict for `input_size` latents (its
    config's sample_size). Keys it does not know are kept, for the strict load to name."""
    converted, embedders = {}, {}
    for key, value in state.items():
        match = re.fullmatch(r'(?:transformer_blocks\.(\d+)\.)?(.+)\.(weight|bias)', key)
        block, name, leaf = match.groups() if match else (None, key, None)
        prefix = '' if block is None else f'blocks.{block}.'
        if name.startswith('norm1.emb.') and name[6:] in _DIFFUSERS_NAMES:
            embedders.setdefault(f'{_DIFFUSERS_NAMES[name[6:]]}.{leaf}', []).append(value)
        elif name in _DIFFUSERS_NAMES:
            converted[f'{prefix}{_DIFFUSERS_NAMES[name]}.{leaf}'] = value
        elif block is None or not name.startswith('attn1.to_'):
            converted[key] = value
    for key, copies in embedders.items():
        if any(not torch.equal(copy, copies[0]) for copy in copies):
            raise DiTCheckpointError(f'diffusers DiT checkpoint has different per-block copies of {key}; DiT has one.')
        converted[key] = copies[0]
    for block in sorted({int(key.split('.')[1]) for key in state if key.startswith('transformer_blocks.')}):
        for leaf in ('weight', 'bias'):
            parts = [state.get(f'transformer_blocks.{block}.attn1.to_{name}.{leaf}') for name in 'qkv']
            if all(part is not None for part in parts):
                converted[f'blocks.{block}.attn.qkv.{leaf}'] = torch.cat(parts)
    if 'x_embedder.proj.weight' in converted:
        hidden, _, patch, _ = converted['x_embedder.proj.weight'].shape
        converted['pos_embed'] = sincos_pos_embed(hidden, input_size // patch)
    return converted


def _load_tensors(path: str) -> object:
    """torch.load of tensors and plain containers only, and of argparse.Namespace, in which DiT's train.py saves its
    options beside the weights (allowed per call where torch has safe_globals, else once for the process)."""
    serialization = torch.serialization
    if hasattr(serialization, 'safe_globals'):
        with serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    if hasattr(serialization, 'add_safe_globals'):
        serialization.add_safe_globals([argparse.Namespace])
    return torch.load(path, map_location='cpu', weights_only=True)


def _read_error(path: str, error: Exception) -> str:
    """One sentence on why torch.load could not read the file at `path` as tensors."""
    text = ' '.join(str(error).split())
    if isinstance(error, OSError):
        return f'Cannot read DiT checkpoint {path}: {error.strerror or text}.'
    if isinstance(error, RuntimeError):  # torch's zip reader: a torn, truncated or non-torch file
        return (
            f'Cannot read DiT checkpoint {path}: it is not a file torch.save wrote, or a damaged one; '
            'copy or download it again.'
        )
    if is_training_state(path):
        return (
            f'{path} is an edm2x training state (for resuming a run), not a network: give a '
            'network-snapshot-*.pkl of its run instead, or make one with reconstruct_phema.py.'
        )
    found = re.search(r'(?:GLOBAL|Unsupported class) ([\w.]+)', text)
    if found and found.group(1) == 'argparse.Namespace':
        return (
            f'Cannot read DiT checkpoint {path}: torch {torch.__version__} cannot load the training options '
            "(argparse.Namespace) in it safely; use torch>=2.4, or save its 'ema' entry alone with torch.save."
        )
    if found:
        return (
            f'Cannot read DiT checkpoint {path}: it holds a {found.group(1)}, which is not unpickled for safety; '
            'a DiT checkpoint holds only tensors (a state dict saved with torch.save).'
        )
    detail = re.search(r'WeightsUnpickler error: (.+?)(?: Check the documentation|$)', text)
    return f'Cannot read DiT checkpoint {path}: {(detail.group(1) if detail else text).rstrip(".")}.'


def load_dit_checkpoint(source: str | dict, input_size: int | None = None, **overrides) -> DiT:
    """DiT from a released checkpoint (a path or a state dict; DiT's training checkpoints, dicts with
    'ema' and 'model', give their 'ema' weights), configured from its weight shapes. The number of
    heads is not in the weights: DiT's sizes give it, other widths get 64 channels per head, and
    `num_heads=` overrides both. A diffusers DiTTransformer2DModel state dict needs `input_size`."""
    state = source
    if isinstance(source, str):
        try:
            state = _load_tensors(source)
        except (OSError, RuntimeError, pickle.UnpicklingError) as error:
            raise DiTCheckpointError(_read_error(source, error)) from None
    if isinstance(state, dict) and 'pos_embed' not in state:
        state = state.get('ema', state.get('model', state))
    if not isinstance(state, dict):
        raise DiTCheckpointError(f'Not a DiT checkpoint: expected a state dict, found {type(state).__name__}.')
    if 'pos_embed.proj.weight' in state:
        if input_size is None:
            raise DiTCheckpointError('A diffusers DiT checkpoint needs input_size (its config.json sample_size).')
        state = dit_state_dict_from_diffusers(state, input_size)
    kwargs = infer_dit_kwargs(state)
    if input_size not in (None, kwargs['input_size']):
        raise DiTCheckpointError(f'The DiT checkpoint is for input size {kwargs["input_size"]}, not {input_size}.')
    net = DiT(**{**kwargs, **overrides})
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = str(error).strip().splitlines()[-1].strip()
        raise DiTCheckpointError(f'DiT checkpoint does not match the DiT layout: {detail}') from None
    return net.eval()
