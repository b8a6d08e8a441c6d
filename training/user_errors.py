"""The exceptions whose message is one sentence for the user (bad input, a missing or unreadable file), and that
sentence on one line: scripts show these as `Error: ...` instead of a traceback."""

import re
import sys
import warnings
from collections.abc import Callable

from training.backbones import BackboneError
from training.dataset import DatasetError
from training.dataset_io import DatasetFileError
from training.detectors import DetectorError
from training.generation import GenerationError
from training.metrics import MetricsError
from training.output_paths import OutputPathError
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
    OutputPathError,
    PrecisionError,
    TrackingError,
    OSError,  # dnnlib.util.DownloadError (a missing download) among them
)


def one_line(err: Exception) -> str:
    """The error's sentence on one line. A DataLoader worker re-raises with its traceback folded into the message:
    then the sentence is the last line, after the exception's name."""
    msg = str(err).strip()
    if 'Original Traceback' in msg:
        msg = msg.splitlines()[-1].split(': ', 1)[-1]
    return re.sub(r'\s+', ' ', msg) or type(err).__name__


def run_with_one_line_errors(main: Callable[[], object]) -> None:
    """Run a script's entry point; a user error ends it with one `Error: ...` line and exit status 1."""
    try:
        main()
    except USER_ERRORS as e:
        sys.exit(f'Error: {one_line(e)}')


def plain_warnings() -> None:
    """Show edm2x's own warnings (categories defined in training.*: an untrusted pickle, a detector unlike the
    published one) as one `Warning: ...` line, without the file, line number and source line Python adds for
    programmers; other warnings keep Python's format. For scripts, called before their entry point."""
    python_format = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None) -> str:
        if category.__module__.startswith('training.'):
            return f'Warning: {message}\n'
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
