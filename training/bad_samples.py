"""Bad samples met during training: an unreadable or wrongly sized image among millions is stepped over and
counted, up to a limit, instead of ending a long run. Opening a dataset still checks what it checks.

A data worker replaces a bad item by the next readable one (so batches keep their size and a resumed run
sees the same data) and passes the error along with the item; the main process logs each bad file once,
counts the skips for `Data/skipped` and asks the loop to stop once more distinct files than the limit
are bad (shard streams count theirs as `Data/corrupt`, training/shards.py)."""

from typing import Any, Sequence

import torch

from torch_utils import distributed as dist
from torch_utils import training_stats
from training.dataset import DatasetError


def _name(message: str) -> str:
    """The file a DatasetError message is about: its text up to the first ': '."""
    return message.split(': ', 1)[0]


def _limit_message(messages: Sequence[str], max_bad: int) -> str:
    names = list(dict.fromkeys(_name(m) for m in messages))
    shown = ', '.join(names[:5]) + (f' and {len(names) - 5} more' if len(names) > 5 else '')
    return (
        f'{len(names)} bad samples met in training, more than --max-bad-samples={max_bad}: {shown}; '
        f'replace or remove them (dataset_tool.py convert) or raise --max-bad-samples, then re-run to resume'
    )


class SkipBadSamples(torch.utils.data.Dataset):
    """A map-style dataset's items with one more entry, `errors`: an item that raises DatasetError is replaced by
    the next readable one in index order; `errors` holds the messages of the items stepped over, one per line
    ('' for none). With max_bad=0 the first bad item raises as it would without this wrapper."""

    def __init__(self, dataset: torch.utils.data.Dataset, max_bad: int) -> None:
        self.dataset, self.max_bad = dataset, max_bad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> tuple[Any, ...]:
        stepped_over: list[str] = []
        for k in range(len(self.dataset)):
            try:
                item = self.dataset[(idx + k) % len(self.dataset)]
                return (*item, '\n'.join(stepped_over))
            except DatasetError as e:
                if self.max_bad == 0:
                    raise
                stepped_over.append(str(e))
                if len(stepped_over) > self.max_bad:
                    break
        raise DatasetError(_limit_message(stepped_over, self.max_bad))


class BadSampleLog:
    """The main process's record of the bad samples its batches stepped over. `stop` is the training loop's
    stop request: once more than max_bad distinct files were bad, it asks for a stop with the message."""

    def __init__(self, max_bad: int, stop: dict) -> None:
        self.max_bad, self.stop = max_bad, stop
        self.messages: dict[str, str] = {}  # By file name, each logged once.
        self.skipped = 0

    def update(self, errors: Sequence[str]) -> None:
        for message in (line for item in errors for line in item.split('\n') if line):
            self.skipped += 1
            if _name(message) not in self.messages:
                self.messages[_name(message)] = message
                print(f'Skipped a bad sample ({len(self.messages)} of at most {self.max_bad}): {message}')
        if len(self.messages) > self.max_bad and not self.stop.get('fault'):
            self.stop.update(stop=True, fault=_limit_message(list(self.messages.values()), self.max_bad))

    def report(self) -> None:
        """Data/skipped: samples stepped over by all ranks since this process started (a collective)."""
        total = torch.tensor([float(self.skipped)], dtype=torch.float64)
        if dist.get_world_size() > 1:
            total = total.to(dist.device())
            torch.distributed.all_reduce(total)
        training_stats.report0('Data/skipped', total.cpu())
