"""Experiment tracking: a run's status scalars, sample grids, options and sweep results sent to TensorBoard
and/or Weights & Biases, on one step axis, the number of training images seen, that resumed runs continue.

The training loop calls begin() once it knows where it resumes, scalars() at every status line and image()
after every sample grid; reconstruct_phema.py and calculate_metrics.py file their sweeps in the same run with
results(). TensorBoard events go into the run folder itself (`tensorboard --logdir runs` shows one run per
folder); W&B keeps its files under RUN/wandb and its run id in RUN/wandb-run-id.txt, so a re-run resumes the
same W&B run."""

import contextlib
import importlib.util
import io
import json
import os
import secrets
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

import dnnlib

LOGGERS = ('tensorboard', 'wandb', 'none')
WANDB_ID_FILE = 'wandb-run-id.txt'
STEP_KEY = 'Progress/nimg'  # The x axis of every W&B chart: images seen, as TensorBoard's global step.


class TrackingError(Exception):
    """A logger that cannot be used as asked; the message is one sentence for the user."""


def check_loggers(loggers: Sequence[str]) -> list[str]:
    """The distinct backends named in `loggers` ('none' names none), each checked to be installed."""
    unknown = [name for name in loggers if name not in LOGGERS]
    if unknown:
        raise TrackingError(f'Unknown logger {unknown[0]!r}; choose from {", ".join(LOGGERS)}.')
    names = list(dict.fromkeys(name for name in loggers if name != 'none'))
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise TrackingError(
                f"--logger={name} needs the {name} package, which is not installed: pip install -e '.[tracking]' "
                f'(or pip install {name}).'
            )
    if 'wandb' in names:
        check_wandb_credentials()
    return names


def check_wandb_credentials() -> None:
    """Online W&B without a terminal needs an API key (`wandb login` or WANDB_API_KEY): checked here, before a
    run folder is touched, rather than when the run opens its backends. At a terminal wandb asks for the key
    itself; offline or disabled W&B needs none."""
    if os.environ.get('WANDB_MODE', '').lower() in ('offline', 'disabled', 'dryrun') or sys.stdin.isatty():
        return
    import wandb

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            wandb.login(verify=False)  # Reads the key from the environment or ~/.netrc; no network.
    except wandb.errors.Error as e:
        raise TrackingError(
            f'--logger=wandb: {e} Or set WANDB_MODE=offline and `wandb sync` the run folder later.'
        ) from None


def _markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(f'{row.get(c, "")}' for c in columns) + ' |' for row in rows]
    return '\n'.join(lines)


class _TensorBoard:
    def __init__(self, run_dir: str, config: dict | None, resume_nimg: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # Events a crashed run logged after its last checkpoint are superseded by the resumed run's.
        self.writer = SummaryWriter(log_dir=run_dir, purge_step=resume_nimg + 1 if resume_nimg else None)
        if config is not None:
            text = '```\n' + json.dumps(config, indent=2) + '\n```'
            self.writer.add_text('options', text, global_step=resume_nimg)

    def scalars(self, values: dict[str, float], nimg: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=nimg)
        self.writer.flush()

    def image(self, tag: str, image: np.ndarray, nimg: int) -> None:
        self.writer.add_image(tag, image, global_step=nimg, dataformats='HWC')
        self.writer.flush()

    def table(self, tag: str, rows: list[dict], nimg: int) -> None:
        self.writer.add_text(tag, _markdown_table(rows), global_step=nimg)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: str, config: dict | None, resume_nimg: int) -> None:
        import wandb

        self.wandb = wandb
        os.makedirs(run_dir, exist_ok=True)
        id_path = os.path.join(run_dir, WANDB_ID_FILE)
        if os.path.isfile(id_path):
            with open(id_path, encoding='utf-8') as f:
                run_id = f.read().strip()
        else:
            run_id = secrets.token_hex(6)
            with dnnlib.util.atomic_write(id_path, 'wt') as f:
                f.write(run_id + '\n')
        try:
            self.run = wandb.init(
                project=os.environ.get('WANDB_PROJECT', 'edm2x'),
                name=os.path.basename(os.path.abspath(run_dir)),
                id=run_id,
                resume='allow',
                dir=run_dir,
                settings=wandb.Settings(console='off', silent=True),  # log.txt already holds the console.
            )
        except wandb.errors.Error as e:
            raise TrackingError(
                f'W&B did not start ({e}); run `wandb login`, or set WANDB_MODE=offline and `wandb sync` later.'
            ) from None
        # Charts plot against images seen, so results logged later for earlier snapshots land in place.
        self.run.define_metric(STEP_KEY)
        self.run.define_metric('*', step_metric=STEP_KEY)
        if config is not None:
            self.run.config.update(config, allow_val_change=True)  # A resume may change --duration etc.

    def scalars(self, values: dict[str, float], nimg: int) -> None:
        self.run.log({**values, STEP_KEY: nimg})

    def image(self, tag: str, image: np.ndarray, nimg: int) -> None:
        self.run.log({tag: self.wandb.Image(image), STEP_KEY: nimg})

    def table(self, tag: str, rows: list[dict], nimg: int) -> None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        table = self.wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.run.log({tag: table, STEP_KEY: nimg})

    def close(self) -> None:
        self.run.finish()


_BACKENDS = dict(tensorboard=_TensorBoard, wandb=_WandB)


class Tracker:
    """Zero or more backends behind one interface; with no loggers every call does nothing.

    >>> tracker = Tracker('runs/demo', ['tensorboard'], config=options)
    >>> tracker.begin(resume_nimg)                # opens the backends; a resumed run continues its axis
    >>> tracker.scalars({'Loss/loss': 0.5}, nimg)
    >>> tracker.image('samples', grid_hwc_uint8, nimg)
    >>> tracker.close()
    """

    def __init__(self, run_dir: str, loggers: Sequence[str], config: dict | None = None) -> None:
        self.run_dir, self.names, self.config = run_dir, check_loggers(loggers), config
        self.backends: list[Any] = []

    def begin(self, resume_nimg: int = 0) -> None:
        """Open the backends; `resume_nimg` is the step the run resumes from (0 for a fresh run)."""
        self.backends = [_BACKENDS[name](self.run_dir, self.config, resume_nimg) for name in self.names]

    def scalars(self, values: dict[str, float], nimg: int) -> None:
        for backend in self.backends:
            backend.scalars({k: float(v) for k, v in values.items()}, nimg)

    def image(self, tag: str, image: np.ndarray, nimg: int) -> None:
        """`image`: uint8 HWC with 1 or 3 channels."""
        image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
        for backend in self.backends:
            backend.image(tag, image, nimg)

    def table(self, tag: str, rows: list[dict], nimg: int) -> None:
        """Results of a sweep, one dict per setting, filed at step `nimg` (the training time they describe)."""
        for backend in self.backends:
            backend.table(tag, rows, nimg)

    def results(self, tag: str, rows: list[dict], nimg: int, scalars: dict[str, float] | None = None) -> None:
        """File a finished sweep's results in the run: open, log the table (and `scalars`), close."""
        if self.names:
            self.begin()
            self.table(tag, rows, nimg)
            self.scalars(scalars or {}, nimg)
            self.close()

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []

    def __enter__(self) -> 'Tracker':
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
