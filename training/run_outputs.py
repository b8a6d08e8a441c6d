"""What a run writes besides its checkpoints: status lines (stdout, stats.jsonl and the trackers), network
snapshots with a fixed-seed sample grid, and the closing line that says where the results are."""

import copy
import json
import math
import os
import time
from typing import Any

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import training_stats
from training import faults
from training.faults import TrainingError
from training.generation import sample
from training.image_grid import GRID_MIN_SIZE, save_image_grid
from training.presets_generate import cascades
from training.snapshots import (
    classic_snapshot_name,
    is_snapshot_name,
    save_snapshot_file,
    snapshot_files,
    snapshot_name,
)
from training.tracking import Tracker


class Status:
    """One status line per call: progress towards `end_nimg`, the time trained (`elapsed_sec` of earlier
    processes of the run included, as EDM2 counts it), ETA, timing, memory, the loss's statistics; appended to
    stats.jsonl and sent to the tracker."""

    def __init__(
        self,
        run_dir: str,
        cur_nimg: int,
        end_nimg: int,
        device: torch.device,
        tracker: Tracker | None = None,
        elapsed_sec: float = 0.0,
    ) -> None:
        self.path = os.path.join(run_dir, 'stats.jsonl')
        self.run_dir, self.device, self.end_nimg, self.tracker = run_dir, device, end_nimg, tracker
        self.last = time.time()
        self.start = self.last - elapsed_sec
        self.last_nimg = cur_nimg
        self.collector = (
            training_stats.Collector()
        )  # Counts from now on, not what earlier runs in this process reported.

    def elapsed_sec(self) -> float:
        """Seconds the run has trained, earlier processes included."""
        return time.time() - self.start

    def __call__(self, cur_nimg: int, loss_fn: Any, net: Any, encoder: Any, dataset_kwargs: dict) -> str | None:
        """Report one status line; on rank 0, the one-line error of a failed stats.jsonl write (else None)."""
        now = time.time()
        trained = cur_nimg - self.last_nimg
        images = max(trained, 1)
        sec_per_kimg = (now - self.last) / images * 1e3
        img_per_sec = trained / max(now - self.last, 1e-9)
        training_stats.report0('Progress/kimg', cur_nimg / 1e3)
        if trained:  # The first line of a run times nothing.
            training_stats.report0('Timing/sec_per_kimg', sec_per_kimg)
            training_stats.report0('Timing/img_per_sec', img_per_sec)
        training_stats.report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30)
        on_gpu = self.device.type == 'cuda'
        if on_gpu:
            training_stats.report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(self.device) / 2**30)
            torch.cuda.reset_peak_memory_stats()
        loss_fn.report(net=net, encoder=encoder, dataset_kwargs=dataset_kwargs, device=self.device)
        self.collector.update()
        means = {name: entry.mean for name, entry in self.collector.as_dict().items() if entry.num}
        loss = means.get('Loss/loss', float('nan'))
        eta = dnnlib.util.format_time((self.end_nimg - cur_nimg) / img_per_sec) if trained else '-'
        kimg = f'{cur_nimg / 1e3:.1f}/{self.end_nimg / 1e3:.1f}'
        line = (
            f'kimg {kimg:<13s} time {dnnlib.util.format_time(now - self.start):<12s} eta {eta:<12s} '
            f'sec/kimg {f"{sec_per_kimg:.2f}" if trained else "-":<8s} '
            f'loss {f"{loss:.4f}" if "Loss/loss" in means else "-":<8s} '
            f'img/s {f"{img_per_sec:.1f}" if trained else "-":<8s} '
            f'cpumem {means["Resources/cpu_mem_gb"]:<6.2f}'
        )
        line += f' gpumem {means["Resources/peak_gpu_mem_gb"]:<6.2f}' if on_gpu else ''
        if 'Data/read' in means:
            dropped = sum(v for k, v in means.items() if k.startswith('Data/dropped/') or k == 'Data/too_small')
            line += f' data read {means["Data/read"]:.0f} dropped {dropped:.0f} corrupt {means["Data/corrupt"]:.0f}'
        dist.print0(line)
        written = None
        if dist.get_rank() == 0:
            try:
                with faults.writing(self.path), open(self.path, 'at') as f:
                    f.write(json.dumps(dict(means, timestamp=now)) + '\n')
            except faults.WriteError as e:
                written = str(e)
            if self.tracker is not None:
                self.tracker.scalars(means, cur_nimg)
        if 'Loss/loss' in means and not math.isfinite(loss):
            raise TrainingError(
                f'Training diverged: the loss is {loss} at kimg {cur_nimg / 1e3:.1f}; '
                f'lower --lr and re-run to resume from the last checkpoint in {self.run_dir}.'
            )
        self.last, self.last_nimg = time.time(), cur_nimg
        return written


def save_snapshots(
    ema: Any,
    loss_fn: Any,
    encoder: Any,
    dataset: Any,
    dataset_kwargs: dict,
    run_dir: str,
    cur_nimg: int,
    fp32: bool,
    sample_steps: int,
    device: torch.device,
    snapshot_format: str = 'pkl',
) -> np.ndarray | None:
    """A network snapshot (pickle, .safetensors or both: `snapshot_format`) per tracked EMA (power-function EMA
    lengths, then classic decays), and a fixed-seed sample grid of the first, so that the grids of one run are
    comparable; the loss chooses the grid's conditioning (or no grid). Returns the grid as saved (HWC, enlarged
    to be seen), or None. A failed write raises faults.WriteError naming the file; the files written before it
    stay."""
    kimg = cur_nimg // 1000
    names = [(net, snapshot_name('network-snapshot', kimg, std)) for net, std in ema.get()]
    names += [(net, classic_snapshot_name('network-snapshot', kimg, beta)) for net, beta in ema.classic()]
    for ema_net, name in names:
        frozen = loss_fn.export(copy.deepcopy(ema_net)).cpu().eval().requires_grad_(False)
        data = dict(
            ema=frozen if fp32 else frozen.to(torch.float16),
            encoder=encoder,
            dataset_kwargs=dataset_kwargs,
            loss_fn=loss_fn,
        )
        for path in snapshot_files(os.path.join(run_dir, name), snapshot_format):
            with faults.writing(path):
                save_snapshot_file(data, path)
    grid_net = loss_fn.export(ema.get()[0][0]).eval()
    grid = 4
    cond = loss_fn.grid_conditioning(grid_net, dataset, encoder, grid * grid, device)
    if cond is None:
        return
    with torch.no_grad():
        images = encoder.decode(sample(grid_net, range(grid * grid), num_steps=sample_steps, **cond).latents)
    path = os.path.join(run_dir, f'samples-{kimg:07d}.png')
    with faults.writing(path):
        return save_image_grid(images.cpu().numpy(), path, grid_w=grid, min_size=GRID_MIN_SIZE)


def closing_line(run_dir: str) -> str:
    """Where the run's newest grid is and how to sample from the run (or that it wrote no snapshot to sample)."""
    names = os.listdir(run_dir)
    grids = sorted(name for name in names if name.startswith('samples-') and name.endswith('.png'))
    grid = f'Final sample grid: {os.path.join(run_dir, grids[-1])}. ' if grids else ''
    if not any(is_snapshot_name(name) for name in names):
        return f'{grid}The run wrote no network snapshots (--snapshot=0): there is nothing to sample from.'
    out = os.path.join(run_dir, 'generated.png')
    command = f'python generate_images.py --net={run_dir} --seeds=0-15 --grid={out}'
    network = _saved_options(run_dir).get('network_kwargs', {})
    if network.get('class_name', '').endswith('CLIPGuide'):
        return (
            f'{grid}Steer a denoiser with this CLIP guide: python generate_images.py --net=DENOISER --clip={run_dir} '
            f'--clip-scale=100 --prompt="..." --seeds=0-15 --grid={out}'
        )
    if network.get('lowres'):
        here = os.path.realpath(run_dir)
        named = [name for name, stages in cascades.items() if any(os.path.realpath(s.net) == here for s in stages)]
        if named:
            return (
                f'{grid}This super-resolution stage is part of the cascade {named[0]!r}: python generate_images.py '
                f'--cascade={named[0]} --prompt="..." --seeds=0-15 --grid={out}'
            )
        return (
            f'{grid}This super-resolution stage runs after its base net: add it to a cascade in '
            f'training/presets_generate.py and run python generate_images.py --cascade=NAME --prompt="..."'
        )
    if network.get('class_name', '').startswith('training.networks_text.'):
        return f'{grid}Sample from the run: {command} --prompt="..."'
    return f'{grid}Sample from the run: {command}'


def _saved_options(run_dir: str) -> dict:
    """The run's training_options.json, or {} where it is missing or unreadable."""
    try:
        with open(os.path.join(run_dir, 'training_options.json'), encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
