"""Feature detectors for FID and FD-DINOv2: where their weights come from and how they are loaded.

Weights are looked up, per metric, in the files or folders named by the `detectors` argument (the
`--detectors` option), else by the EDM2X_DETECTORS environment variable (comma-separated list of
files, folders or URLs), else downloaded from the published URL through dnnlib's cache. A folder is
searched for the published file names below; a file or URL is assigned to a metric by its name
('inception' -> fid, 'dinov2' -> fd_dinov2). Every detector maps uint8 NCHW RGB images to features.
"""

import os
import pickle
import sys
import warnings

import torch
from torch import nn

import dnnlib
from training.dinov2 import DinoVisionTransformer, vit_kwargs_from_state_dict
from training.inception import InceptionV3

DETECTORS_ENV = 'EDM2X_DETECTORS'

# metric -> (file names recognised in a folder, in order of preference; default download URL).
# inception-2015-12-05.pkl is NVIDIA's TorchScript translation, the detector EDM2's numbers come from.
DETECTOR_FILES: dict[str, tuple[tuple[str, ...], str]] = {
    'fid': (
        ('inception-2015-12-05.pkl', 'pt_inception-2015-12-05-6726825d.pth'),
        'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth',
    ),
    'fd_dinov2': (
        ('dinov2_vitl14_pretrain.pth',),
        'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth',
    ),
}
METRICS = tuple(DETECTOR_FILES)
PUBLISHED_DINOV2 = dict(embed_dim=1024, depth=24, patch_size=14)  # ViT-L/14, the detector of FD-DINOv2 as published.
_NAME_HINTS = {'fid': 'inception', 'fd_dinov2': 'dinov2'}


class DetectorError(Exception):
    """A detector's weights could not be found or do not match its architecture (one-line message)."""


class DetectorWarning(UserWarning):
    """A detector loaded, but its numbers will not compare with published ones."""


class TorchScriptInception(nn.Module):
    """Adapter for NVIDIA's TorchScript Inception pickle, called as net(images, return_features=True).
    The feature size is read off one tiny probe image rather than assumed."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        with torch.no_grad():
            self.feature_dim = int(self.forward(torch.zeros([1, 3, 8, 8], dtype=torch.uint8)).shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.contiguous(), return_features=True)


def _is_url(s: str) -> bool:
    return '://' in s


def _metric_for_name(name: str) -> str | None:
    base = os.path.basename(name).lower()
    return next((m for m, hint in _NAME_HINTS.items() if hint in base), None)


def resolve_detector_sources(metrics: list[str], detectors: str | None = None) -> dict[str, str]:
    """Local path or URL of each metric's weights, from `detectors`, then $EDM2X_DETECTORS, then the web."""
    spec = detectors if detectors is not None else os.environ.get(DETECTORS_ENV, '')
    origin = '--detectors' if detectors is not None else DETECTORS_ENV
    found: dict[str, str] = {}
    for entry in (e.strip() for e in spec.split(',') if e.strip()):
        entry = os.path.expanduser(entry)
        if os.path.isdir(entry):
            for metric, (names, _url) in DETECTOR_FILES.items():
                hits = [os.path.join(entry, n) for n in names if os.path.isfile(os.path.join(entry, n))]
                if hits and metric not in found:
                    found[metric] = hits[0]
            continue
        if not _is_url(entry) and not os.path.isfile(entry):
            raise DetectorError(f'{origin} names {entry}, which does not exist.')
        metric = _metric_for_name(entry)
        if metric is None:
            raise DetectorError(
                f'{origin} names {entry}, but its file name says neither "inception" (FID) '
                f'nor "dinov2" (FD-DINOv2); rename it, or pass its folder.'
            )
        found.setdefault(metric, entry)
    return {m: found.get(m, DETECTOR_FILES[m][1]) for m in metrics}


def _folders_searched(detectors: str | None) -> tuple[str, list[str]]:
    spec = detectors if detectors is not None else os.environ.get(DETECTORS_ENV, '')
    entries = (os.path.expanduser(e.strip()) for e in spec.split(',') if e.strip())
    return ('--detectors' if detectors is not None else DETECTORS_ENV), [e for e in entries if os.path.isdir(e)]


def fetch_detector_files(metrics: list[str], detectors: str | None = None, verbose: bool = True) -> dict[str, str]:
    """The local file of each metric's weights, found as resolve_detector_sources() finds them and downloaded
    where needed. Every file that cannot be had is named in one DetectorError, with the folders searched."""
    sources = resolve_detector_sources(metrics, detectors)
    origin, folders = _folders_searched(detectors)
    paths, failures = {}, []
    for metric, source in sources.items():
        names = ' or '.join(DETECTOR_FILES[metric][0])
        if verbose and folders and _is_url(source):
            print(f'{origin} folder(s) {", ".join(folders)} hold no {names}; downloading it.', file=sys.stderr)
        try:
            paths[metric] = dnnlib.util.open_url(source, return_filename=True, num_attempts=3, verbose=verbose)
        except dnnlib.util.DownloadError as err:
            failures.append(f'{names} for {metric} ({err})')
    if failures:
        searched = f'searched {origin} folder(s) {", ".join(folders)}' if folders else f'no folder named by {origin}'
        raise DetectorError(
            f'Missing detector weights ({searched}): {"; ".join(failures)} Alternatively put the files in one '
            f'folder and name it with --detectors or {DETECTORS_ENV}.'
        )
    return paths


def _fetch(metric: str, source: str, verbose: bool) -> str:
    try:
        return dnnlib.util.open_url(source, return_filename=True, num_attempts=3, verbose=verbose)
    except dnnlib.util.DownloadError as err:
        names = ' or '.join(DETECTOR_FILES[metric][0])
        raise DetectorError(
            f'{err} Alternatively put {names} in a folder and name it with --detectors or {DETECTORS_ENV}.'
        ) from None


def _load_state_dict(module: nn.Module, state: object, path: str, ignored: tuple[str, ...], what: str) -> nn.Module:
    """Load `state` into a module built on the meta device, checking every name and shape first.
    Batch-norm step counters and the `ignored` names are dropped: the detectors never train."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DetectorError(f'{path} is not a state dict of tensors, so it cannot hold {what} weights.')
    state = {k: v.float() for k, v in state.items() if k not in ignored and not k.endswith('.num_batches_tracked')}
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        problems = [
            f'{label} {", ".join(keys[:3])}{" ..." if len(keys) > 3 else ""}'
            for label, keys in (('missing', missing), ('unexpected', unexpected), ('wrong shape', reshaped))
            if keys
        ]
        raise DetectorError(f'{path} does not hold {what} weights ({"; ".join(problems)}).')
    module.load_state_dict(state, assign=True)
    return module


def _load_inception(path: str) -> nn.Module:
    if path.endswith('.pkl'):
        with open(path, 'rb') as f:
            net = pickle.load(f)
        if not isinstance(net, nn.Module):
            raise DetectorError(f'{path} does not hold a TorchScript Inception module (found {type(net).__name__}).')
        return TorchScriptInception(net)
    with torch.device('meta'):
        module = InceptionV3()
    state = torch.load(path, map_location='cpu', weights_only=True)
    # The published port also holds the 1008-way classifier, unused here.
    return _load_state_dict(module, state, path, ('fc.weight', 'fc.bias'), 'FID Inception-v3')


def _load_dinov2(path: str) -> nn.Module:
    state = torch.load(path, map_location='cpu', weights_only=True)
    needed = ('cls_token', 'pos_embed', 'patch_embed.proj.weight')
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise DetectorError(f'{path} is not a DINOv2 checkpoint (it lacks {", ".join(needed)}).')
    unsupported = sorted(k for k in state if k == 'register_tokens' or '.mlp.w12.' in k or '.mlp.w3.' in k)
    if unsupported:
        raise DetectorError(
            f'{path} is a DINOv2 ViT-g (SwiGLU feed-forward) or has register tokens ({unsupported[0]}); '
            f'only ViT-S/14, ViT-B/14 and ViT-L/14 without registers load, e.g. dinov2_vitl14_pretrain.pth.'
        )
    kwargs = vit_kwargs_from_state_dict(state)
    if not PUBLISHED_DINOV2.items() <= kwargs.items():
        warnings.warn(
            f'{path} is a DINOv2 ViT of width {kwargs["embed_dim"]}, depth {kwargs["depth"]} and patch '
            f'{kwargs["patch_size"]}, not ViT-L/14; its FD-DINOv2 will not compare with published numbers.',
            DetectorWarning,
            stacklevel=3,
        )
    with torch.device('meta'):
        module = DinoVisionTransformer(**kwargs)
    # mask_token only serves masked-image training.
    return _load_state_dict(module, state, path, ('mask_token',), 'DINOv2 ViT')


def load_detector(metric: str, source: str, device: torch.device | str = 'cpu', verbose: bool = True) -> nn.Module:
    """The detector of `metric` ('fid' or 'fd_dinov2') from a local path or URL, in eval mode on `device`.
    The module maps uint8 NCHW RGB images to features of size `module.feature_dim`."""
    if metric not in DETECTOR_FILES:
        raise DetectorError(f'Unknown metric "{metric}"; choose from {", ".join(METRICS)}.')
    path = _fetch(metric, source, verbose)
    try:
        module = _load_inception(path) if metric == 'fid' else _load_dinov2(path)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise DetectorError(
            f'{path} could not be read as {metric} detector weights: {str(err).splitlines()[0]}'
        ) from None
    return module.eval().requires_grad_(False).to(device)
