"""Training losses, the interface between a loss and the training loop, and the learning-rate schedule.

The training loop knows a loss only through the methods of `TrainingLoss`, and calls all of them for
every loss, so that a new kind of training needs no special case in the loop:

- `loss(net, images, labels) -> Tensor`: per-sample (or per-element) losses of one batch; the maths.
- `accumulate(net, batches, num_rounds, scale)`: back-propagate one optimiser step's share of this
  process: `num_rounds` batches drawn from the iterator `batches`, the sum of their losses times
  `scale`. The default runs the rounds one at a time (gradient accumulation) and lets DDP synchronise
  on the last; CLIPLoss overrides it to see the whole share at once (gradient caching).
- `report(net, encoder, dataset_kwargs, device)`: extra statistics at each status line (default none).
- `grid_conditioning(net, dataset, encoder, num, device) -> dict | None`: conditioning of the sample
  grid drawn beside each snapshot, as keyword arguments of `training.generation.sample`; None draws
  no grid (a CLIP guide makes no images).
- `export(net) -> net`: the network that snapshots hold and sample grids use, an EDM denoiser D(x; σ);
  the trained net itself by default, VPLoss wraps its net(x_t, t, labels) as one.

The noise levels of training follow EDM2: ln σ ~ N(P_mean, P_std²) (EDM, arXiv 2206.00364, §5); the
defaults below (EDM2's ImageNet-512 setting) are the only place they are declared.
"""

import math
from typing import Any, Iterator

import torch

from torch_utils import misc, persistence, training_stats

P_MEAN = -0.4
P_STD = 1.0


def unwrap(net: Any) -> Any:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return getattr(net, 'module', net)


class TrainingLoss:
    """Base of the training losses: noise-level draws and the default training-loop hooks."""

    def __init__(self, P_mean: float = P_MEAN, P_std: float = P_STD) -> None:
        self.P_mean = P_mean
        self.P_std = P_std

    def sample_sigma(self, images: torch.Tensor) -> torch.Tensor:
        """One noise level per image, shape [N, 1, 1, 1], with ln σ ~ N(P_mean, P_std²)."""
        return (torch.randn([images.shape[0], 1, 1, 1], device=images.device) * self.P_std + self.P_mean).exp()

    def __call__(self, net: Any, images: torch.Tensor, labels: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def accumulate(self, net: Any, batches: Iterator[tuple[torch.Tensor, Any]], num_rounds: int, scale: float) -> None:
        for k in range(num_rounds):
            with misc.ddp_sync(net, sync=k == num_rounds - 1):
                images, labels = next(batches)
                loss = self(net, images, labels)
                training_stats.report('Loss/loss', loss)
                loss.sum().mul(scale).backward()

    def report(self, net: Any, encoder: Any, dataset_kwargs: dict, device: torch.device) -> None:
        pass

    def grid_conditioning(
        self, net: Any, dataset: Any, encoder: Any, num: int, device: torch.device
    ) -> dict[str, Any] | None:
        return {}

    def export(self, net: Any) -> Any:
        return net


# EDM2 loss with learned uncertainty u(σ) (EDM2, arXiv 2312.02696, Eq. 21; weighting λ(σ) of EDM Table 1).
@persistence.persistent_class
class EDM2Loss(TrainingLoss):
    """Weighted denoising loss λ(σ)/e^u(σ) · ‖D(y + n; σ) − y‖² + u(σ), per element.

    σ_data, in λ(σ) = (σ² + σ_data²)/(σ·σ_data)², is the network's own (`net.sigma_data`); the
    `sigma_data` argument, if given, overrides it (options files written before the loss read it).
    """

    def __init__(self, P_mean: float = P_MEAN, P_std: float = P_STD, sigma_data: float | None = None) -> None:
        super().__init__(P_mean=P_mean, P_std=P_std)
        self.sigma_data = sigma_data

    def __call__(self, net: Any, images: torch.Tensor, labels: Any = None, **net_kwargs: Any) -> torch.Tensor:
        sigma = self.sample_sigma(images)
        sigma_data = self.sigma_data if self.sigma_data is not None else unwrap(net).sigma_data
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        noisy = images + torch.randn_like(images) * sigma
        denoised, logvar = net(noisy, sigma, labels, return_logvar=True, **net_kwargs)
        return weight / logvar.exp() * (denoised - images) ** 2 + logvar


# α(t) = α_ref / sqrt(max(t / t_ref, 1)) with t in batches, times a linear warm-up (EDM2 Eq. 67);
# ref_batches = 0 and rampup_Mimg = 0 give a constant α_ref (DiT's recipe).
def learning_rate_schedule(
    cur_nimg: int, batch_size: int, ref_lr: float = 100e-4, ref_batches: float = 70e3, rampup_Mimg: float = 10
) -> float:
    decay = math.sqrt(max(cur_nimg / (ref_batches * batch_size), 1)) if ref_batches > 0 else 1
    warmup = min(cur_nimg / (rampup_Mimg * 1e6), 1) if rampup_Mimg > 0 else 1
    return ref_lr / decay * warmup
