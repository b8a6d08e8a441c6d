"""The training loop: data, network, optimiser and EMA; status lines, snapshots with sample grids,
checkpoints, resume, and a clean stop on SIGTERM/SIGINT/SIGUSR1, a full disk or too many bad samples.

What a step computes belongs to the loss (training/loss.py); the loop calls the loss's hooks for
every kind of training and knows nothing of text, super-resolution or CLIP.
"""

import contextlib
import signal
from typing import Any, Iterator

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc, training_stats
from torch_utils.host_memory import keep_freed_memory
from training import checkpoint as ckpt
from training import faults
from training.bad_samples import BadSampleLog, SkipBadSamples
from training.faults import TrainingError

# Options files written before training/loss.py existed name `training.training_loop.EDM2Loss` and
# `training.training_loop.learning_rate_schedule`; these names keep them loadable.
from training.loss import EDM2Loss, learning_rate_schedule  # noqa: F401
from training.networks_edm2 import set_checkpointing
from training.precision import compile_module, set_tf32
from training.run_outputs import Status, closing_line, save_snapshots
from training.shard_position import DataPosition
from training.tracking import Tracker

# ----------------------------------------------------------------------------
# Stop requests and data workers.


@contextlib.contextmanager
def _stop_signals_caught() -> Iterator[dict]:
    """SIGTERM/SIGINT and SIGUSR1 (SLURM's --signal warning before the time limit) set a flag; the loop then
    checkpoints and exits at the end of the step. A fault (too many bad samples) stops the same way, with its
    message. The previous handlers come back on exit, so a caller (a test, a notebook) gets its Ctrl-C back."""
    flag = dict(stop=False, signal=None, fault=None)

    def handler(signum, frame):
        flag.update(stop=True, signal=flag['signal'] or signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
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
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.alarm(_WORKER_GRACE_S))


@contextlib.contextmanager
def _data_batches(dataset, sampler, batch_gpu: int, data_loader_kwargs: dict) -> Iterator:
    """An endless iterator of batches whose worker processes are shut down however the loop ends; a
    traceback holding the iterator would otherwise keep them alive."""
    loader = torch.utils.data.DataLoader(
        dataset=dataset,
        sampler=sampler,
        batch_size=batch_gpu,
        worker_init_fn=_worker_defers_stop_signals,
        **data_loader_kwargs,
    )
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, '_shutdown_workers', None)  # Only the multi-process iterator has workers.
        if shutdown is not None:
            shutdown()


def _encoded(
    batches: Iterator, encoder: Any, device: torch.device, position: DataPosition | None, bad: BadSampleLog | None
) -> Iterator[tuple[torch.Tensor, Any]]:
    """Data batches in network space on `device`, encoded lazily, one per request; captions stay strings.
    A streamed batch's position records go to `position`, the bad samples it stepped over to `bad`, as the
    batch is consumed."""
    for images, labels, *info in batches:
        if position is not None:
            position.update(info[0])
        if bad is not None:
            bad.update(info[-1])
        images = images.to(device, non_blocking=True)  # from pinned memory on CUDA: overlaps the copy
        labels = labels.to(device, non_blocking=True) if torch.is_tensor(labels) else labels
        yield encoder.encode_latents(images), labels


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True when any rank says so; all ranks must stop at the same step or their collectives deadlock."""
    if dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item())


_STOP_CHECK_STEPS = 8  # Steps between stop agreements of several ranks (each one a host-device sync).


# ----------------------------------------------------------------------------
# Resume.


def _resume(run_dir: str, net: Any, optimizer: Any, ema: Any) -> tuple[int, list | None, dict | None, float]:
    """Load the newest checkpoint of the run that loads, if any: (images seen, per-rank RNG states or None,
    the data stream's position or None, seconds trained before). Elastic restarts (torchrun --max-restarts)
    come through here too."""
    if dist.get_rank() == 0 and faults.remove_stale_temp_files(run_dir):
        dist.print0(f'Removed the temporary files of writes a killed run left unfinished in {run_dir}')
    found = ckpt.load_newest_valid(run_dir)
    if found is None:
        return 0, None, None, 0.0
    path, state = found
    dist.print0(f'Resuming from {path}')
    try:
        net.load_state_dict(state['net'])
        optimizer.load_state_dict(state['optimizer'])
        ema.load_state_dict(state['ema'])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ckpt.CheckpointError(
            f'{path} was written by a run with other options ({faults.first_line(e)}); resume with the options '
            f'in training_options.json or use a new --outdir'
        ) from None
    rng = state['rng']
    if len(rng) != dist.get_world_size():
        dist.print0(
            f'Note: checkpoint was written by {len(rng)} processes, resuming with {dist.get_world_size()}: '
            'random streams restart, so the run is no longer bit-reproducible.'
        )
        rng = None
    return state['cur_nimg'], rng, state.get('data'), float(state.get('elapsed_sec', 0.0))  # (older states: 0)


# ----------------------------------------------------------------------------
# One optimiser step.


def _zero_nonfinite_grads(net: torch.nn.Module) -> None:
    """NaN and ±inf gradient elements become 0 and are counted (on the device: no sync per step)."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    training_stats.report('Loss/nonfinite_grads', sum((~torch.isfinite(g)).sum() for g in grads))
    for g in grads:
        torch.nan_to_num_(g, nan=0, posinf=0, neginf=0)


def split_batch(batch_size: int, batch_gpu: int | None, world: int) -> tuple[int, int]:
    """(images per rank and step, images per forward pass); the rounds of accumulation are their ratio."""
    per_rank = batch_size // world
    batch_gpu = batch_gpu or per_rank
    if per_rank < 1:
        raise TrainingError(
            f'--batch={batch_size} leaves no image for each of {world} processes; give at least {world}.'
        )
    if batch_size % world or per_rank % batch_gpu:
        raise TrainingError(
            f'--batch={batch_size} must split evenly over {world} processes and --batch-gpu={batch_gpu}.'
        )
    return per_rank, batch_gpu


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
    snapshot_format: str = 'pkl',
    sample_steps: int = 32,
    keep_checkpoints: int | None = None,
    continue_on_snapshot_error: bool = False,
    max_bad_samples: int = 10,
    tf32: bool = False,
    compile_net: bool = False,
    checkpointing: bool = False,
    device: torch.device | None = None,
    tracker: Tracker | None = None,
    dataset: torch.utils.data.Dataset | None = None,
) -> bool:
    """Train to total_nimg (or stop_at_nimg); True when a stop signal ended it early, its state saved.
    `dataset`: the one dataset_kwargs name, when the caller has constructed it already (train_edm2.py has)."""
    device = device or dist.device()
    training_stats.reset()  # a run in the same process as a diverged one starts without its NaN sums
    keep_freed_memory(device)  # on CPU: no page faults for every step's activations (torch_utils/host_memory.py)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.backends.cudnn.benchmark = cudnn_benchmark
    set_tf32(tf32)
    torch.manual_seed(seed * world + rank)
    np.random.seed((seed * world + rank) % (1 << 31))
    per_rank, batch_gpu = split_batch(batch_size, batch_gpu, world)
    end_nimg = min(total_nimg, stop_at_nimg or total_nimg)

    construct = dnnlib.util.construct_class_by_name
    dataset = construct(**dataset_kwargs) if dataset is None else dataset
    encoder = construct(**encoder_kwargs)
    encoder.init(device)
    first_image = dataset[0][0]
    shape = encoder.encode_latents(torch.as_tensor(first_image).to(device).unsqueeze(0)).shape
    net = construct(img_resolution=shape[-1], img_channels=shape[1], label_dim=dataset.label_dim, **network_kwargs)
    net.train().requires_grad_(True).to(device)
    streaming = isinstance(dataset, torch.utils.data.IterableDataset)
    size = f'{len(dataset.shards)} shards' if streaming else f'{len(dataset)} items'
    dist.print0(f'Dataset: {size} of shape {list(first_image.shape)}, label_dim {dataset.label_dim}')
    dist.print0(f'Network: {sum(p.numel() for p in net.parameters()):,} parameters')
    loss_fn = construct(**loss_kwargs)
    optimizer = construct(params=net.parameters(), **optimizer_kwargs)
    ema = construct(net=net, **ema_kwargs)
    if checkpointing and not set_checkpointing(net):
        raise TrainingError('--checkpointing applies to U-Net networks; this network has no U-Net blocks.')
    compile_module(net, compile_net)  # After the EMA's copies, which stay plain modules.
    ddp = net
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == 'cuda' else None)
    cur_nimg, rng_states, data_state, elapsed_sec = _resume(run_dir, net, optimizer, ema)
    if cur_nimg >= total_nimg and cur_nimg > 0:
        dist.print0(f'{run_dir} is already complete at kimg {cur_nimg / 1e3:.1f}; raise --duration to train on.')
        dist.print0(closing_line(run_dir))
        return False
    if tracker is not None:
        tracker.begin(cur_nimg)
    dist.print0(
        *faults.disk_plan(
            run_dir, net, ema, cur_nimg, end_nimg, snapshot_nimg, checkpoint_nimg, snapshot_fp32, keep_checkpoints
        ),
        sep='\n',
    )
    position = None
    if streaming:
        num_slots = world * max(data_loader_kwargs.get('num_workers', 0), 1)
        position = DataPosition(dataset.filter_names(), num_slots, dataset.fingerprint())
        dataset.set_position(position.restore(data_state))

    def due(interval: int | None, done: bool) -> bool:
        # At the first step on or past each multiple of the interval, which need not be one of the batch.
        return bool(interval) and (done or cur_nimg // interval > (cur_nimg - batch_size) // interval)

    sampler = None
    if not streaming:
        sampler = misc.InfiniteSampler(dataset=dataset, rank=rank, num_replicas=world, seed=seed, start_idx=cur_nimg)
    items = dataset if streaming else SkipBadSamples(dataset, max_bad_samples)
    with _stop_signals_caught() as stop, _data_batches(items, sampler, batch_gpu, data_loader_kwargs) as loader:
        if rng_states is not None:
            ckpt.set_rng_state(rng_states[rank])  # After the DataLoader, which draws its own base seed.
        bad = None if streaming else BadSampleLog(max_bad_samples, stop)
        batches = _encoded(loader, encoder, device, position, bad)
        status = Status(run_dir, cur_nimg, end_nimg, device, tracker, elapsed_sec)
        first_nimg = cur_nimg
        while True:
            done = cur_nimg >= end_nimg
            agree_now = world == 1 or due(status_nimg, done) or (cur_nimg // batch_size) % _STOP_CHECK_STEPS == 0
            stopping = not done and agree_now and _all_ranks_agree(stop['stop'], device)
            resumed_here = cur_nimg == first_nimg  # This state was just loaded (or is the start): not saved again.
            if due(status_nimg, done) and (cur_nimg == 0 or not resumed_here):
                if position is not None:
                    position.report()
                if bad is not None:
                    bad.report()
                error = faults.first_error(status(cur_nimg, loss_fn, net, encoder, dataset_kwargs))
                if error is not None:  # stats.jsonl: no place to report the run's progress, as at a snapshot.
                    stop['fault'] = f'{error}; free space and re-run to resume'
                    stopping = not done
            if due(snapshot_nimg, done) and not resumed_here:
                error = grid = None
                if rank == 0:
                    try:
                        grid = save_snapshots(
                            ema,
                            loss_fn,
                            encoder,
                            dataset,
                            dataset_kwargs,
                            run_dir,
                            cur_nimg,
                            snapshot_fp32,
                            sample_steps,
                            device,
                            snapshot_format,
                        )
                    except faults.WriteError as e:
                        error = str(e)
                if grid is not None and tracker is not None:
                    tracker.image('samples', grid, cur_nimg)
                error = faults.first_error(error)
                if error is not None and continue_on_snapshot_error:
                    dist.print0(f'Warning: {error}; training goes on (--continue-on-snapshot-error).')
                elif error is not None:
                    stop['fault'] = f'{error}; free space and re-run to resume, or pass --continue-on-snapshot-error'
                    stopping = not done
            if (due(checkpoint_nimg, done) or stopping) and not resumed_here:
                state = dict(
                    net=net.state_dict(),
                    optimizer=optimizer.state_dict(),
                    ema=ema.state_dict(),
                    cur_nimg=cur_nimg,
                    elapsed_sec=status.elapsed_sec(),
                    loss_fn=loss_fn,
                    data=position.state() if position is not None else None,
                )
                ckpt.save_training_state(run_dir, state, keep_checkpoints)
            if done or stopping:
                fault = faults.first_error(stop['fault'])
                if fault is not None:
                    raise TrainingError(fault)
            if stopping:
                dist.print0(
                    f'Stop requested ({stop["signal"] or "on another process"}): state saved at kimg '
                    f'{cur_nimg / 1e3:.1f}; re-run the same command to resume.'
                )
                return True
            if done:
                if cur_nimg >= total_nimg:
                    dist.print0(closing_line(run_dir))
                return False

            # The gradient of the mean loss over the global batch: each rank sums its share times
            # 1/per_rank, and DDP averages the ranks' gradients.
            lr = dnnlib.util.call_func_by_name(cur_nimg=cur_nimg, batch_size=batch_size, **lr_kwargs)
            optimizer.zero_grad(set_to_none=True)
            loss_fn.accumulate(ddp, batches, per_rank // batch_gpu, loss_scaling / per_rank)
            if force_finite:
                _zero_nonfinite_grads(net)
            training_stats.report('Progress/lr', lr)
            for group in optimizer.param_groups:
                group['lr'] = lr
            optimizer.step()
            cur_nimg += batch_size
            ema.update(cur_nimg=cur_nimg, batch_size=batch_size)
