"""Scalar statistics reported anywhere in the training code and collected, across ranks, at status time.

`report()` adds the moments [count, sum, sum of squares] (float64) of its values to per-name counters
without synchronising the device. `Collector.update()` all-reduces the counters across ranks (when a
process group is initialised) and exposes num / mean / std of what was reported since its last update."""

import math
import re
from typing import Any

import torch

import dnnlib

_counter_dtype = torch.float64
_rank: int | None = None  # Set by init_multiprocessing; else read from torch.distributed.
_sync_device: torch.device | None = None  # Device the all-reduce runs on; None: chosen by backend.
_pending: dict[str, dict[torch.device, torch.Tensor]] = {}  # Moments reported since the last sync, per device.
_cumulative: dict[str, torch.Tensor] = {}  # All-rank moments since start (CPU, float64).


def init_multiprocessing(rank: int, sync_device: Any) -> None:
    """Tell the module this process's rank and the device for all-reduces (a CUDA device for NCCL)."""
    global _rank, _sync_device
    _rank = rank
    _sync_device = torch.device(sync_device) if sync_device is not None else None


def reset() -> None:
    """Forget every moment reported or collected so far, for a new run in the same process: a NaN reported by
    an earlier (diverged) run would otherwise stay in the cumulative sums and every later interval's mean.
    Collectors made before the reset are void; make new ones."""
    _pending.clear()
    _cumulative.clear()


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _get_rank() -> int:
    if _rank is not None:
        return _rank
    return torch.distributed.get_rank() if _dist_ready() else 0


def report(name: str, value: Any) -> Any:
    """Accumulate every element of `value` (number or tensor of any shape) under `name`; returns `value`."""
    elems = torch.as_tensor(value).detach().flatten().to(_counter_dtype)
    moments = torch.stack([torch.ones_like(elems).sum(), elems.sum(), elems.square().sum()])
    per_device = _pending.setdefault(name, {})
    if elems.device in per_device:
        per_device[elems.device].add_(moments)
    else:
        per_device[elems.device] = moments
    return value


def report0(name: str, value: Any) -> Any:
    """Like report(), but only rank 0's values count (for statistics every rank would repeat)."""
    return report(name, value if _get_rank() == 0 else [])


def _sync(names: list[str]) -> list[str]:
    """Fold pending moments of the matching names (over all ranks) into `_cumulative`; a collective call.
    Returns the names known on any rank, sorted, so that all ranks agree on the order."""
    world = torch.distributed.get_world_size() if _dist_ready() else 1
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, sorted(names))
        names = sorted(set().union(*gathered))
    else:
        names = sorted(names)
    if not names:
        return names
    device = _sync_device
    if device is None:
        nccl = world > 1 and torch.distributed.get_backend() == 'nccl'
        device = torch.device('cuda', torch.cuda.current_device()) if nccl else torch.device('cpu')
    deltas = torch.zeros([len(names), 3], dtype=_counter_dtype, device=device)
    for i, name in enumerate(names):
        for moments in _pending.pop(name, {}).values():
            deltas[i] += moments.to(device)
    if world > 1:
        torch.distributed.all_reduce(deltas)
    deltas = deltas.cpu()
    for i, name in enumerate(names):
        _cumulative[name] = _cumulative.get(name, torch.zeros(3, dtype=_counter_dtype)) + deltas[i]
    return names


class Collector:
    """A view of the reported statistics whose names match `regex`, refreshed by update().

    With keep_previous=True a name that got no new values keeps the statistics of its last interval;
    otherwise it reads num 0 and mean/std nan."""

    def __init__(self, regex: str = '.*', keep_previous: bool = True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        # _cumulative at this collector's last update; starts now, so earlier intervals are not counted.
        self._seen = {name: moments.clone() for name, moments in _cumulative.items()}
        self._moments: dict[str, torch.Tensor] = {}  # Moments of the last interval.

    def names(self) -> list[str]:
        """Names this collector has seen, sorted."""
        return sorted(self._moments)

    def update(self) -> None:
        """Collect what was reported since the last update; every rank must call it at the same point."""
        local = [name for name in set(_pending) | set(_cumulative) if self._regex.fullmatch(name)]
        for name in _sync(local):
            if not self._regex.fullmatch(name):
                continue
            delta = _cumulative[name] - self._seen.get(name, torch.zeros(3, dtype=_counter_dtype))
            self._seen[name] = _cumulative[name].clone()
            if delta[0] > 0 or not self._keep_previous or name not in self._moments:
                self._moments[name] = delta

    def num(self, name: str) -> int:
        """Number of scalars reported under `name` in the last interval (0 if unknown)."""
        moments = self._moments.get(name)
        return int(moments[0]) if moments is not None else 0

    def mean(self, name: str) -> float:
        """Mean of the last interval's scalars, nan if there were none."""
        moments = self._moments.get(name)
        if moments is None or moments[0] == 0:
            return float('nan')
        return float(moments[1] / moments[0])

    def std(self, name: str) -> float:
        """Population standard deviation (ddof 0) of the last interval's scalars, nan if there were none."""
        moments = self._moments.get(name)
        if moments is None or moments[0] == 0:
            return float('nan')
        mean = float(moments[1] / moments[0])
        # Rounding can push E[x²] − mean² slightly below zero for constant values.
        return math.sqrt(max(float(moments[2] / moments[0]) - mean**2, 0.0))

    def as_dict(self) -> dict[str, dnnlib.EasyDict]:
        """{name: EasyDict(num, mean, std)} for every name, ready for JSON."""
        return {
            name: dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name)) for name in self.names()
        }


default_collector = Collector()
