"""Where a shard stream stands, for checkpoints and status lines.

Each sample a ShardDataset yields carries its slot's record (training/shards.py, INFO_* columns): the
pass, how many samples the slot's shuffle buffer had emitted, and running counts of samples read,
dropped by each filter, too small and corrupt. The training loop hands every batch it consumes to
DataPosition.update, so the state covers exactly the samples trained on, not those prefetched."""

from typing import Any

import torch

from torch_utils import distributed as dist
from torch_utils import training_stats
from training.shards import INFO_CORRUPT, INFO_EMITTED, INFO_PASS, INFO_READ, INFO_SLOT, INFO_SMALL, NUM_INFO_FIXED


class DataPosition:
    """Per-slot position {slot: (pass, emitted)} and counters of one rank's consumed samples."""

    def __init__(self, filter_names: list[str], num_slots: int, fingerprint: str) -> None:
        self.filter_names = list(filter_names)
        self.num_slots, self.fingerprint = num_slots, fingerprint
        self.position: dict[int, tuple[int, int]] = {}
        self._counts: dict[int, torch.Tensor] = {}

    def update(self, info: torch.Tensor) -> None:
        for row in info.cpu():
            slot, here = int(row[INFO_SLOT]), (int(row[INFO_PASS]), int(row[INFO_EMITTED]))
            if here >= self.position.get(slot, (-1, -1)):
                self.position[slot] = here
                self._counts[slot] = row

    def state(self) -> dict:
        """The position of every rank's slots (a collective when distributed), for the checkpoint."""
        mine = dict(self.position)
        if dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            torch.distributed.all_gather_object(gathered, mine)
            mine = {slot: pos for part in gathered for slot, pos in part.items()}
        return dict(num_slots=self.num_slots, fingerprint=self.fingerprint, slots=mine)

    def restore(self, state: dict | None) -> dict[int, tuple[int, int]]:
        """The position to resume from, or {} (restart the pass) with a note when the layout changed."""
        if not state:
            return {}
        if state['fingerprint'] != self.fingerprint:
            dist.print0('Note: --data or --filter changed since the checkpoint; the data stream starts a new pass.')
            return {}
        if state['num_slots'] != self.num_slots:
            first = min((p for p, _ in state['slots'].values()), default=0)
            dist.print0(
                f'Note: checkpoint streamed with {state["num_slots"]} data workers in all, now {self.num_slots}; '
                f'the data stream restarts pass {first}.'
            )
            return {slot: (first, 0) for slot in range(self.num_slots)}
        self.position = {int(slot): tuple(pos) for slot, pos in state['slots'].items()}
        return dict(self.position)

    def report(self) -> None:
        """Data/read, Data/dropped/<filter>, Data/too_small and Data/corrupt: counts over all ranks since this
        process started (a collective when distributed)."""
        total = torch.zeros(NUM_INFO_FIXED + len(self.filter_names), dtype=torch.float64)
        for row in self._counts.values():
            total += row.double()
        if dist.get_world_size() > 1:
            total = total.to(dist.device())
            torch.distributed.all_reduce(total)
            total = total.cpu()
        training_stats.report0('Data/read', total[INFO_READ])
        training_stats.report0('Data/corrupt', total[INFO_CORRUPT])
        training_stats.report0('Data/too_small', total[INFO_SMALL])
        for k, name in enumerate(self.filter_names):
            training_stats.report0(f'Data/dropped/{name}', total[NUM_INFO_FIXED + k])
