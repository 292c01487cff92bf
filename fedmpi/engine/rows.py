"""Inputs kept in the shard file's dtype on the device; rows become float32 only when a batch is gathered.

A uint8 image block takes a quarter of its float32 size; converting only the gathered rows (the same
`.float().mul_(pixel_scale)` as converting the whole block) gives bit-identical batches.
"""
from __future__ import annotations

import torch


def batch_rows(data: torch.Tensor, idx, scale: float) -> torch.Tensor:
    """Rows `data[idx]` as float32 inputs: times `scale` unless they are float32 at scale 1 (used as they are)."""
    rows = data[idx]
    if rows.dtype != torch.float32:
        return rows.float().mul_(scale)  # .float() made a copy: scaling it in place leaves the block alone
    # A slice of a float32 block is a view of it: scaled out of place, the block stays as read.
    return rows if scale == 1.0 else rows * scale


class Inputs:
    """A block of input rows in the file's dtype (uint8 with its pixel_scale, or float32) on one device.

    Indexing gathers through batch_rows, so engines and scoring index it as they would a float32
    tensor (`x[idx]`, `x[a:b]`) while only the gathered rows are ever float32.
    """

    dtype = torch.float32  # the dtype of every gathered batch

    def __init__(self, data: torch.Tensor, scale: float = 1.0) -> None:
        self.data, self.scale = data, float(scale)

    def __getitem__(self, idx) -> torch.Tensor:
        return batch_rows(self.data, idx, self.scale)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def element_size(self) -> int:
        """Bytes of one value of a gathered batch (float32), as torch.Tensor.element_size."""
        return 4

    def reshape(self, *shape) -> Inputs:
        """The same rows in another shape (a view of the stored block), still converted when gathered."""
        return Inputs(self.data.reshape(*shape), self.scale)

    def stored_bytes(self) -> int:
        """Bytes the block takes on its device."""
        return self.data.numel() * self.data.element_size()
