"""bench/solver_error.py's plot: its axis names the reference the RMSE was measured against."""

import importlib.util
import os

import pytest
from conftest import ROOT


def _solver_error():
    spec = importlib.util.spec_from_file_location('solver_error', os.path.join(ROOT, 'bench', 'solver_error.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_plot_names_the_reference_of_its_rows(tmp_path, monkeypatch):
    plt = pytest.importorskip('matplotlib.pyplot')
    solver_error = _solver_error()
    nfes = [5, 10]
    rows = [dict(solver='heun', schedule='karras', steps=32, nfe=63, rmse=0.0, seconds=0.0)]  # --reference-steps=32
    rows += [
        dict(solver=solver, schedule=schedule, steps=nfe, nfe=nfe, rmse=0.1 / nfe, seconds=0.0)
        for solver, schedule in solver_error.SETTINGS
        for nfe in nfes
    ]
    labels = []
    close = plt.close

    def read_label_and_close(fig):
        labels.append(fig.axes[0].get_ylabel())
        close(fig)

    monkeypatch.setattr(plt, 'close', read_label_and_close)
    solver_error.plot(rows, nfes, str(tmp_path / 'plot.png'), 'demo')
    assert labels == ['RMSE vs 63-NFE Heun (pixels in [-1, 1])']
    assert (tmp_path / 'plot.png').stat().st_size > 0
