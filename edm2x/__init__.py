"""edm2x from Python: `load` a network (snapshot, run folder, URL or preset), `Network.sample` images, `reconstruct`
a post-hoc EMA, measure `fid`. The functions live in training/api.py, on the same code the command-line tools run."""

from training.api import Network, fid, load, reconstruct

__all__ = ['Network', 'fid', 'load', 'reconstruct']
