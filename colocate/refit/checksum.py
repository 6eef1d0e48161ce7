"""Per-tensor checksums for the optional verification mode: cheap on any device, computed in place."""

from __future__ import annotations

import torch


def checksum(data_u8: torch.Tensor) -> int:
    """Sum of the bytes read as int32 words (and the tail as bytes), in int64: no copy of the data."""
    n = data_u8.numel()
    words = n // 4 * 4
    total = torch.zeros((), dtype=torch.int64, device=data_u8.device)
    if words and data_u8.data_ptr() % 4 == 0:
        total = total + data_u8[:words].view(torch.int32).sum(dtype=torch.int64)
    else:
        words = 0
    if n > words:
        total = total + data_u8[words:].sum(dtype=torch.int64)
    return int(total.item())
