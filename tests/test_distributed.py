"""Tests for torch_utils.distributed and training_stats: single process, and a real 2-process gloo run."""

import contextlib
import gc
import io
import json
import math
import os
import socket
import sys
import weakref

import numpy as np
import pytest
import torch

from torch_utils import distributed, training_stats


def _rank_values(rank: int) -> np.ndarray:
    """Each rank reports different values, and a different number of them."""
    return np.random.default_rng(rank).normal(loc=rank, size=[rank + 2, 3])


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    distributed.init()
    collector = training_stats.Collector(regex='loss|only0')
    training_stats.report('loss', torch.from_numpy(_rank_values(rank)))
    training_stats.report0('only0', float(rank + 10))
    training_stats.report('ignored', 1.0)
    collector.update()

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        distributed.print0('hello')

    distributed.barrier()

    result = dict(
        rank=distributed.get_rank(),
        world=distributed.get_world_size(),
        names=collector.names(),
        stats=collector.as_dict(),
        printed=printed.getvalue(),
        backend=torch.distributed.get_backend(),
    )
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


def _gloo_threads() -> list[str]:
    """Names of this process's threads that gloo started (Linux names its threads in /proc)."""
    tasks = '/proc/self/task'
    names = [open(os.path.join(tasks, task, 'comm')).read().strip() for task in os.listdir(tasks)]
    return [name for name in names if 'gloo' in name]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init()
    gc.disable()  # as when the collector has not run by the end of a run

    def train() -> weakref.ref:
        net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        net(torch.randn(2, 4)).sum().backward()
        return weakref.ref(net)

    ddp = train()
    alive_before = ddp() is not None
    distributed.finish()
    result = dict(
        alive_before=alive_before,
        alive_after=ddp() is not None,
        group=torch.distributed.is_initialized(),
        gloo_threads=_gloo_threads(),
    )
    with open(os.path.join(out_dir, 'ddp.json'), 'w') as f:
        json.dump(result, f)


def test_finish_frees_a_finished_ddp_module_and_its_group_before_exit(tmp_path):
    # The gloo exit race: a DDP module that survives until interpreter teardown takes the group's threads and
    # their tensors with it there, where they cannot take the GIL (SIGABRT). finish() must free it first.
    # A fresh interpreter as under torchrun: a forked one inherits what earlier tests imported and set up.
    # The group is gone when its threads are: destroy_process_group only forgets it, and DDP's first import of
    # torch.distributed.nn bound it as a default argument there, which kept it and its threads alive.
    if not os.path.isdir('/proc/self/task'):
        pytest.skip('needs /proc/self/task')
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=1, start_method='spawn'
    )
    result = json.loads((tmp_path / 'ddp.json').read_text())
    assert result == dict(alive_before=True, alive_after=False, group=False, gloo_threads=[])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)


def test_two_gloo_ranks_agree_with_direct_statistics(tmp_path):
    world = 2
    # Fork skips re-importing torch in each child (seconds); other platforms need spawn.
    start_method = 'fork' if sys.platform == 'linux' else 'spawn'
    torch.multiprocessing.start_processes(
        _worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, start_method=start_method
    )
    results = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(world)]
    union = np.concatenate([_rank_values(r).ravel() for r in range(world)])
    for rank, result in enumerate(results):
        assert (result['rank'], result['world'], result['backend']) == (rank, world, 'gloo')
        assert result['names'] == ['loss', 'only0']
        loss = result['stats']['loss']
        assert loss['num'] == union.size
        assert math.isclose(loss['mean'], union.mean(), rel_tol=1e-12)
        assert math.isclose(loss['std'], union.std(), rel_tol=1e-12)
        assert result['stats']['only0'] == {'num': 1, 'mean': 10.0, 'std': 0.0}
        assert result['printed'] == ('hello\n' if rank == 0 else '')


def test_single_process_without_env_has_no_process_group(no_torchrun_env, capsys):
    distributed.init()
    assert not torch.distributed.is_initialized()
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.get_local_rank()) == (0, 1, 0)
    assert distributed.is_main()
    assert distributed.device() == torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')
    distributed.print0('only', 'once')
    distributed.barrier()
    assert capsys.readouterr().out == 'only once\n'


def test_partial_torchrun_env_is_a_clear_error(no_torchrun_env, monkeypatch):
    monkeypatch.setenv('RANK', '0')
    with pytest.raises(RuntimeError, match='MASTER_ADDR'):
        distributed.init()


def test_collector_intervals_and_keep_previous():
    values = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 5, 6.5]
    keep = training_stats.Collector(regex='t_interval')
    drop = training_stats.Collector(regex='t_interval', keep_previous=False)
    for v in values:
        training_stats.report('t_interval', v)
    keep.update()
    drop.update()
    flat = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.5])
    for c in (keep, drop):
        assert c.num('t_interval') == flat.size
        assert math.isclose(c.mean('t_interval'), flat.mean()) and math.isclose(c.std('t_interval'), flat.std())
    keep.update()
    drop.update()
    assert keep.num('t_interval') == flat.size and drop.num('t_interval') == 0
    assert math.isnan(drop.mean('t_interval'))
    training_stats.report('t_interval', torch.tensor([-1.0, 1.0]))
    keep.update()
    assert keep.as_dict() == {'t_interval': {'num': 2, 'mean': 0.0, 'std': 1.0}}


def test_collectors_do_not_steal_each_others_values():
    first = training_stats.Collector(regex='t_shared')
    training_stats.report('t_shared', [1.0, 3.0])
    first.update()
    second = training_stats.Collector(regex='t_shared')
    training_stats.report('t_shared', 10.0)
    second.update()
    first.update()
    assert second.num('t_shared') == 1 and second.mean('t_shared') == 10.0
    assert first.num('t_shared') == 1 and first.mean('t_shared') == 10.0
    assert training_stats.Collector(regex='t_unreported').names() == []
