"""Held-out split and retrieval accuracy of the noise-aware CLIP guide (GLIDE, Nichol et al. 2021).

The last `holdout` files of a dataset (in sorted path order) are held out; `HeldOutSplit` serves
either part with the caption as the label. `report_retrieval` measures image→text top-1 retrieval
among the held-out captions at fixed noise levels σ and reports it to training_stats, so that each
status line of stats.jsonl shows how the guide's accuracy falls from low to high σ.
"""

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import training_stats
from training.dataset import DatasetError, ImageFolderDataset


class HeldOutSplit(ImageFolderDataset):
    """ImageFolderDataset restricted to its training part or its held-out part (the last `holdout` files)."""

    def __init__(self, path: str, holdout: int = 256, split: str = 'train', **kwargs) -> None:
        super().__init__(path, **kwargs)
        num_raw = len(self._image_fnames)
        if split not in ('train', 'holdout'):
            raise DatasetError(f"split must be 'train' or 'holdout', not {split!r}")
        if not 0 < holdout < num_raw:
            raise DatasetError(f'{path}: cannot hold out {holdout} of {num_raw} images; use a smaller holdout')
        keep = (self._raw_idx >= num_raw - holdout) == (split == 'holdout')
        self._raw_idx, self._xflip = self._raw_idx[keep], self._xflip[keep]

    def __getitem__(self, idx: int) -> tuple[np.ndarray, str]:
        return super().__getitem__(idx)[0], self.get_caption(idx)


def retrieval_top1(
    net, images: torch.Tensor, captions: list[str], sigma: float, seed: int = 0, batch: int = 256
) -> float:
    """Fraction of noisy images whose most similar caption (among `captions`) equals their own."""
    gen = torch.Generator(images.device).manual_seed(seed)
    noise = torch.randn(images.shape, generator=gen, device=images.device)
    txt = net.encode_text(captions)
    img = torch.cat(
        [
            net.encode_image(images[i : i + batch] + sigma * noise[i : i + batch], sigma)
            for i in range(0, len(images), batch)
        ]
    )
    best = (img @ txt.T).argmax(dim=1).tolist()
    return float(np.mean([captions[j] == captions[i] for i, j in enumerate(best)]))


def report_retrieval(loss, net, encoder, dataset_kwargs: dict, device: torch.device) -> None:
    """Report Retrieval/top1_sigma{σ} for each of loss.eval_sigmas, and Retrieval/chance (rank 0 only)."""
    if dist.get_rank() != 0:
        return
    if getattr(loss, '_cache_holdout', None) is None:
        ds = dnnlib.util.construct_class_by_name(**dict(dataset_kwargs, split='holdout', xflip=False))
        images = torch.stack([torch.as_tensor(ds[i][0]) for i in range(len(ds))])
        loss._cache_holdout = (images, [ds.get_caption(i) for i in range(len(ds))])
    images, captions = loss._cache_holdout
    was_training = net.training
    net.eval()
    with torch.no_grad():
        x = encoder.encode_latents(images.to(device))
        for sigma in loss.eval_sigmas:
            training_stats.report0(f'Retrieval/top1_sigma{sigma:g}', retrieval_top1(net, x, captions, sigma))
    net.train(was_training)
    # Chance: a random caption equals the image's own with probability (copies of it) / N.
    counts = {c: captions.count(c) for c in set(captions)}
    training_stats.report0('Retrieval/chance', float(np.mean([counts[c] / len(captions) for c in captions])))
