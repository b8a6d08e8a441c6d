"""Writing generated images into one .npz and/or one PNG grid without gathering them in memory.

Every rank writes each image, as it comes, into its row of one shared uncompressed .npy file beside the output
(positional writes: any rank, any order); once all ranks are done, rank 0 copies that file in chunks into the
.npz (a zip holding arr_0.npy, as np.savez writes it) and tiles the grid from it. The memory of the .npz is
one chunk, whatever the number of images (50k images at 512x512 would be 39 GB held in memory otherwise);
the grid PNG is one image of them all by nature.
"""

import contextlib
import os
import zipfile

import numpy as np

import dnnlib
from torch_utils import distributed as dist
from training.image_grid import save_image_grid

_CHUNK_BYTES = 64 << 20


class ImageSink:
    """Collects uint8 HWC images of `seeds` (in that order) for an .npz at `npz` and/or a PNG grid at `grid`.
    add() each of this rank's images, then call finish() on every rank (it waits for all ranks)."""

    def __init__(self, seeds: list[int], grid: str | None, npz: str | None) -> None:
        self.grid, self.npz = grid, npz
        self.rows = {seed: i for i, seed in enumerate(seeds)}
        target = npz or grid
        self.path = None if target is None else f'{target}.rows'  # beside the output: the same filesystem
        self.fd, self.shape = None, None

    def add(self, seed: int, image: np.ndarray) -> None:
        """Write one image [H, W, C] uint8 into its row of the rows file (no header: raw rows in seed order)."""
        if self.path is None:
            return
        if self.fd is None:
            # Every rank creates or opens it, never truncating: every row gets written, and what an interrupted
            # run left beyond the rows is never read. It appears with the first image, so errors before leave none.
            os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
            self.fd, self.shape = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), image.shape
        if image.shape != self.shape or image.dtype != np.uint8:
            raise ValueError(f'Image of seed {seed} is {image.dtype} {image.shape}; expected uint8 {self.shape}.')
        os.pwrite(self.fd, np.ascontiguousarray(image).tobytes(), self.rows[seed] * image.nbytes)

    def abort(self) -> None:
        """Close and remove the rows file after a failed or interrupted run (a re-run writes every row again, so
        nothing in it is worth keeping, and for 50k large images it is tens of GB). The file is shared: under
        torchrun the first failing rank that wrote to it removes it, and the other ranks are stopped anyway."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def finish(self) -> None:
        """Wait for every rank; rank 0 (which always holds the first seed) writes the .npz and the grid."""
        if self.path is None:
            return
        if self.fd is not None:
            os.close(self.fd)
        dist.barrier()
        if dist.get_rank() != 0:
            return
        try:
            if self.shape is None:
                return  # no seeds
            rows = np.memmap(self.path, dtype=np.uint8, mode='r', shape=(len(self.rows), *self.shape))
            if self.npz is not None:
                self._write_npz(rows)
            if self.grid is not None:
                os.makedirs(os.path.dirname(self.grid) or '.', exist_ok=True)
                save_image_grid(rows.transpose(0, 3, 1, 2), self.grid)
        finally:
            os.remove(self.path)

    def _write_npz(self, rows: np.memmap) -> None:
        """np.savez's layout (arr_0.npy, uncompressed) written in chunks of rows."""
        os.makedirs(os.path.dirname(self.npz) or '.', exist_ok=True)
        step = max(_CHUNK_BYTES // rows[0].nbytes, 1)
        with dnnlib.util.atomic_write(self.npz) as f, zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as zf:
            with zf.open('arr_0.npy', 'w', force_zip64=True) as member:
                header = dict(descr='|u1', fortran_order=False, shape=rows.shape)
                np.lib.format.write_array_header_1_0(member, header)
                for start in range(0, len(rows), step):
                    member.write(np.ascontiguousarray(rows[start : start + step]).tobytes())
