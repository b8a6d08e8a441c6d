"""EDM2 training: loss, learning-rate schedule and the main loop with snapshots, checkpoints and resume."""

import contextlib
import copy
import json
import math
import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc, persistence, training_stats
from training import checkpoint as ckpt
from training.image_grid import save_image_grid
from training.sampling import StackedRandomGenerator, edm_sampler
from training.snapshots import save_network_pickle, snapshot_name


class TrainingError(Exception):
    """Training cannot go on; the message is one sentence for the user."""


# EDM2 loss with learned uncertainty u(σ), EDM2 Eq. 21 and SPEC §3.
@persistence.persistent_class
class EDM2Loss:
    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None):
        sigma = (torch.randn([images.shape[0], 1, 1, 1], device=images.device) * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        noise = torch.randn_like(images) * sigma
        denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
        return (weight / logvar.exp()) * (denoised - images) ** 2 + logvar


# Inverse-square-root decay after ref_batches, linear warm-up over rampup_Mimg (EDM2 Eq. 67).
def learning_rate_schedule(
    cur_nimg: int, batch_size: int, ref_lr: float = 100e-4, ref_batches: float = 70e3, rampup_Mimg: float = 10
) -> float:
    lr = ref_lr
    if ref_batches > 0:
        lr /= math.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return lr


def _is_due(cur_nimg: int, interval: int | None, done: bool) -> bool:
    return bool(interval) and (done or cur_nimg % interval == 0)


def _save_sample_grid(net, encoder, path: str, device, num_steps: int, grid_size: int = 4, dataset=None) -> None:
    """A fixed-seed grid from an EMA net, so successive grids of one run are comparable."""
    seeds = list(range(grid_size * grid_size))
    rnd = StackedRandomGenerator(device, seeds)
    noise = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    labels = None
    if net.label_dim:
        labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)])]
    with torch.no_grad():
        if hasattr(net, 'text_encoder'):  # Text and super-resolution nets: the data's first captions (SPEC §8).
            from training.cascade import dataset_conditioning, sample_stage  # cascade imports this module

            cond = dataset_conditioning(net, dataset, encoder, len(seeds), device)
            latents = sample_stage(net, noise, num_steps=num_steps, randn_like=rnd.randn_like, **cond)
        else:
            latents = edm_sampler(net, noise, labels, num_steps=num_steps, randn_like=rnd.randn_like)
        images = encoder.decode(latents)
    save_image_grid(images.cpu().numpy(), path, grid_w=grid_size)


def _save_snapshots(
    ema,
    encoder,
    dataset,
    dataset_kwargs: dict,
    loss_fn,
    run_dir: str,
    cur_nimg: int,
    snapshot_fp32: bool,
    device,
    sample_steps: int,
) -> None:
    """One network pickle per tracked EMA length, and a sample grid from the first."""
    for ema_net, ema_std in ema.get():
        data = dnnlib.EasyDict(encoder=encoder, dataset_kwargs=dataset_kwargs, loss_fn=loss_fn)
        data.ema = copy.deepcopy(ema_net).cpu().eval().requires_grad_(False)
        if not snapshot_fp32:
            data.ema = data.ema.to(torch.float16)
        save_network_pickle(
            dict(data), os.path.join(run_dir, snapshot_name('network-snapshot', cur_nimg // 1000, ema_std))
        )
        del data
    grid_net = ema.get()[0][0]
    if getattr(grid_net, 'makes_images', True):  # A CLIP guide is no denoiser: no grid.
        grid_net.eval()
        _save_sample_grid(
            grid_net,
            encoder,
            os.path.join(run_dir, f'samples-{cur_nimg // 1000:07d}.png'),
            device,
            sample_steps,
            dataset=dataset,
        )


@contextlib.contextmanager
def _stop_signals_caught() -> Iterator[dict]:
    """SIGTERM/SIGINT set a flag; the loop then checkpoints and exits at the end of the step. The previous
    handlers come back on exit, so a caller (a test, a notebook) gets its Ctrl-C back."""
    flag = dict(stop=False)

    def handler(signum, frame):
        flag['stop'] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)


_WORKER_GRACE_S = 60  # How long a data worker outlives a SIGTERM while the main process checkpoints.


def _worker_defers_stop_signals(worker_id: int) -> None:
    """Schedulers and Ctrl-C signal every process of the job; a data worker dying first would crash the
    main process before it saves its state. So a worker ignores SIGINT and dies _WORKER_GRACE_S after a
    SIGTERM (SIGALRM's default action) unless the main process shuts it down sooner, as it does after
    checkpointing. Ignoring SIGTERM outright would hang multiprocessing's exit, which terminates and
    then joins leftover workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.alarm(_WORKER_GRACE_S))


@contextlib.contextmanager
def _data_batches(dataset, sampler, batch_gpu: int, data_loader_kwargs: dict) -> Iterator:
    """An endless iterator of batches whose worker processes are shut down however the loop ends; a
    traceback holding the iterator would otherwise keep them alive."""
    iterator = iter(
        torch.utils.data.DataLoader(
            dataset=dataset,
            sampler=sampler,
            batch_size=batch_gpu,
            worker_init_fn=_worker_defers_stop_signals,
            **data_loader_kwargs,
        )
    )
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, '_shutdown_workers', None)  # Only the multi-process iterator has workers.
        if shutdown is not None:
            shutdown()


def _agreed_stop(flag: dict, device) -> bool:
    """All ranks stop at the same step, or their collectives would deadlock."""
    if dist.get_world_size() == 1:
        return flag['stop']
    t = torch.tensor([float(flag['stop'])], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item())


def training_loop(
    dataset_kwargs: dict,
    encoder_kwargs: dict,
    data_loader_kwargs: dict,
    network_kwargs: dict,
    loss_kwargs: dict,
    optimizer_kwargs: dict,
    lr_kwargs: dict,
    ema_kwargs: dict,
    run_dir: str = '.',
    seed: int = 0,
    batch_size: int = 2048,
    batch_gpu: int | None = None,
    total_nimg: int = 8 << 30,
    status_nimg: int | None = 128 << 10,
    snapshot_nimg: int | None = 8 << 20,
    checkpoint_nimg: int | None = 128 << 20,
    stop_at_nimg: int | None = None,
    loss_scaling: float = 1,
    force_finite: bool = True,
    cudnn_benchmark: bool = True,
    snapshot_fp32: bool = False,
    sample_steps: int = 32,
    device: torch.device | None = None,
) -> None:
    device = device or dist.device()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.manual_seed(seed * world + rank)
    np.random.seed((seed * world + rank) % (1 << 31))
    batch_gpu_total = batch_size // world
    batch_gpu = batch_gpu or batch_gpu_total
    if batch_size % world or batch_gpu_total % batch_gpu:
        raise TrainingError(
            f'--batch={batch_size} must split evenly over {world} processes and --batch-gpu={batch_gpu}.'
        )
    num_accumulation_rounds = batch_gpu_total // batch_gpu
    stop_at_nimg = min(total_nimg, stop_at_nimg or total_nimg)

    # Data, encoder, network.
    dataset = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    encoder = dnnlib.util.construct_class_by_name(**encoder_kwargs)
    encoder.init(device)
    ref_image = dataset[0][0]
    ref_latent = encoder.encode_latents(torch.as_tensor(ref_image).to(device).unsqueeze(0))
    net = dnnlib.util.construct_class_by_name(
        img_resolution=ref_latent.shape[-1],
        img_channels=ref_latent.shape[1],
        label_dim=dataset.label_dim,
        **network_kwargs,
    )
    net.train().requires_grad_(True).to(device)
    dist.print0(f'Dataset: {len(dataset)} items of shape {list(ref_image.shape)}, label_dim {dataset.label_dim}')
    dist.print0(f'Network: {sum(p.numel() for p in net.parameters()):,} parameters')

    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    if getattr(loss_fn, 'owns_accumulation', False):  # E.g. CLIPLoss's gradient caching: one round, its own chunks.
        loss_fn.batch_gpu, batch_gpu, num_accumulation_rounds = batch_gpu, batch_gpu_total, 1
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    ema = dnnlib.util.construct_class_by_name(net=net, **ema_kwargs)
    ddp = (
        torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)
        if world > 1
        else net
    )

    # Resume from the newest checkpoint in the run directory, if any.
    cur_nimg, rng_states = 0, None
    resume_path = ckpt.find_latest_checkpoint(run_dir)
    if resume_path is not None:
        dist.print0(f'Resuming from {resume_path}')
        state = ckpt.load_checkpoint(resume_path)
        net.load_state_dict(state['net'])
        optimizer.load_state_dict(state['optimizer'])
        ema.load_state_dict(state['ema'])
        cur_nimg = state['cur_nimg']
        rng_states = state['rng']
        if len(rng_states) != world:
            dist.print0(
                f'Note: checkpoint was written by {len(rng_states)} processes, resuming with {world}: '
                'random streams restart, so the run is no longer bit-reproducible.'
            )
            rng_states = None
        del state

    sampler = misc.InfiniteSampler(dataset=dataset, rank=rank, num_replicas=world, seed=seed, start_idx=cur_nimg)
    with (
        _stop_signals_caught() as stop_flag,
        _data_batches(dataset, sampler, batch_gpu, data_loader_kwargs) as dataset_iterator,
    ):
        if rng_states is not None:
            ckpt.set_rng_state(rng_states[rank])  # After the DataLoader, which draws its own base seed.

        stats_path = os.path.join(run_dir, 'stats.jsonl')
        start_nimg, start_time = cur_nimg, time.time()
        prev_status_time, prev_status_nimg = start_time, cur_nimg
        while True:
            done = cur_nimg >= stop_at_nimg
            stop_requested = not done and _agreed_stop(stop_flag, device)
            at_start = cur_nimg == start_nimg

            if _is_due(cur_nimg, status_nimg, done) and (not at_start or cur_nimg == 0):
                now = time.time()
                sec_per_kimg = (now - prev_status_time) / max(cur_nimg - prev_status_nimg, 1) * 1e3
                training_stats.report0('Progress/kimg', cur_nimg / 1e3)
                training_stats.report0('Timing/sec_per_kimg', sec_per_kimg)
                training_stats.report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30)
                if device.type == 'cuda':
                    training_stats.report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30)
                    torch.cuda.reset_peak_memory_stats()
                if hasattr(loss_fn, 'status_report'):  # Statistics of the loss's own, e.g. CLIP's held-out retrieval.
                    loss_fn.status_report(net=net, encoder=encoder, dataset_kwargs=dataset_kwargs, device=device)
                training_stats.default_collector.update()
                stats = training_stats.default_collector.as_dict()
                loss_mean = stats['Loss/loss'].mean if 'Loss/loss' in stats else float('nan')
                images_per_sec = (cur_nimg - prev_status_nimg) / max(now - prev_status_time, 1e-9)
                dist.print0(
                    f'kimg {cur_nimg / 1e3:<9.1f} time {dnnlib.util.format_time(now - start_time):<12s} '
                    f'sec/kimg {sec_per_kimg:<8.2f} loss {loss_mean:<8.4f} img/s {images_per_sec:<8.1f} '
                    f'cpumem {stats["Resources/cpu_mem_gb"].mean:<6.2f}'
                    + (f' gpumem {stats["Resources/peak_gpu_mem_gb"].mean:<6.2f}' if device.type == 'cuda' else '')
                )
                if rank == 0:
                    with open(stats_path, 'at') as f:
                        f.write(json.dumps(dict({k: v.mean for k, v in stats.items()}, timestamp=now)) + '\n')
                if 'Loss/loss' in stats and not math.isfinite(loss_mean):
                    raise TrainingError(
                        f'Training diverged: the loss is {loss_mean} at kimg {cur_nimg / 1e3:.1f}; '
                        f'lower --lr and re-run to resume from the last checkpoint in {run_dir}.'
                    )
                prev_status_time, prev_status_nimg = time.time(), cur_nimg

            if _is_due(cur_nimg, snapshot_nimg, done) and not at_start and rank == 0:
                _save_snapshots(
                    ema,
                    encoder,
                    dataset,
                    dataset_kwargs,
                    loss_fn,
                    run_dir,
                    cur_nimg,
                    snapshot_fp32,
                    device,
                    sample_steps,
                )

            if (_is_due(cur_nimg, checkpoint_nimg, done) or stop_requested) and not at_start:
                rng_states = ckpt.gather_rng_states()
                if rank == 0:
                    ckpt.save_checkpoint(
                        os.path.join(run_dir, ckpt.checkpoint_name(cur_nimg // 1000)),
                        dict(
                            net=net.state_dict(),
                            optimizer=optimizer.state_dict(),
                            ema=ema.state_dict(),
                            cur_nimg=cur_nimg,
                            rng=rng_states,
                            loss_fn=loss_fn,
                        ),
                    )
                if world > 1:
                    torch.distributed.barrier()
            if done or stop_requested:
                if stop_requested:
                    dist.print0(
                        f'Stop requested: state saved at kimg {cur_nimg / 1e3:.1f}; re-run the same command to resume.'
                    )
                break

            # One optimiser step over the global batch, accumulated in rounds of batch_gpu per process.
            lr = dnnlib.util.call_func_by_name(cur_nimg=cur_nimg, batch_size=batch_size, **lr_kwargs)
            optimizer.zero_grad(set_to_none=True)
            for round_idx in range(num_accumulation_rounds):
                with misc.ddp_sync(ddp, sync=(round_idx == num_accumulation_rounds - 1)):
                    images, labels = next(dataset_iterator)
                    images = encoder.encode_latents(images.to(device))
                    labels = labels.to(device) if isinstance(labels, torch.Tensor) else labels  # Captions stay strings.
                    loss = loss_fn(net=ddp, images=images, labels=labels)
                    training_stats.report('Loss/loss', loss)
                    loss.sum().mul(loss_scaling / batch_gpu_total).backward()
            for g in optimizer.param_groups:
                g['lr'] = lr
            if force_finite:
                grads = [p.grad for p in net.parameters() if p.grad is not None]
                nonfinite = sum((~torch.isfinite(g)).sum() for g in grads)  # Stays on the device: no sync per step.
                for g in grads:
                    torch.nan_to_num(g, nan=0, posinf=0, neginf=0, out=g)
                training_stats.report('Loss/nonfinite_grads', nonfinite)
            training_stats.report('Progress/lr', lr)
            optimizer.step()
            cur_nimg += batch_size
            ema.update(cur_nimg=cur_nimg, batch_size=batch_size)
