"""The one-line sentence scripts print for user errors (training.user_errors.one_line)."""

import torch

from training.dataset import DatasetError
from training.user_errors import one_line


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, idx):
        raise DatasetError('Image 7 of data.zip is corrupt: truncated file.')


def test_an_error_raised_in_a_dataloader_worker_is_its_own_sentence():
    loader = torch.utils.data.DataLoader(_Broken(), num_workers=1)
    try:
        next(iter(loader))
    except DatasetError as e:
        assert 'Original Traceback' in str(e)  # the worker folded its traceback into the message
        assert one_line(e) == 'Image 7 of data.zip is corrupt: truncated file.'
    else:
        raise AssertionError('the worker raised nothing')


def test_a_message_over_several_lines_is_joined_onto_one():
    assert one_line(OSError('No space left\n  on device: runs/x')) == 'No space left on device: runs/x'
    assert one_line(ValueError('')) == 'ValueError'
