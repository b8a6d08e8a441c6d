"""dnnlib: small utilities that edm2x and the network pickles it loads rely on."""

from . import util
from .util import EasyDict, make_cache_dir_path

__all__ = ['util', 'EasyDict', 'make_cache_dir_path']
