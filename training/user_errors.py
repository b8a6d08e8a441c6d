"""The exceptions whose message is one sentence for the user (bad input, a missing or unreadable file), and that
sentence on one line: scripts show these as `Error: ...` instead of a traceback."""

import sys
from collections.abc import Callable

from training.backbones import BackboneError
from training.dataset import DatasetError
from training.dataset_io import DatasetFileError
from training.detectors import DetectorError
from training.generation import GenerationError
from training.metrics import MetricsError
from training.precision import PrecisionError
from training.snapshots import NetworkPickleError
from training.tracking import TrackingError

USER_ERRORS = (
    BackboneError,
    DatasetError,
    DatasetFileError,
    DetectorError,
    GenerationError,
    MetricsError,
    NetworkPickleError,
    PrecisionError,
    TrackingError,
    OSError,  # dnnlib.util.DownloadError (a missing download) among them
)


def one_line(err: Exception) -> str:
    """The error's sentence. DataLoader workers re-raise with the worker's traceback folded into the message: its
    last line is the sentence."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    return last.split(': ', 1)[1] if last.startswith('training.') and ': ' in last else last


def run_with_one_line_errors(main: Callable[[], object]) -> None:
    """Run a script's entry point; a user error ends it with one `Error: ...` line and exit status 1."""
    try:
        main()
    except USER_ERRORS as e:
        sys.exit(f'Error: {one_line(e)}')
