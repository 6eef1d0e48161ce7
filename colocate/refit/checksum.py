"""Per-tensor checksums for the optional verification mode (cheap on any device, computed in place), and
fingerprints of what reached an engine, for the tests and benchmarks that check it."""

from __future__ import annotations

import hashlib

import torch

from colocate.refit.slices import Slice


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


def fingerprint(t: torch.Tensor) -> str:
    """Exact on CPU (sha256 of the bytes); on GPU the on-device word sum, to keep 16 GB on the device."""
    if t.is_cuda:
        return f"sum:{checksum(t.contiguous().view(-1).view(torch.uint8))}"
    flat = t.detach().contiguous().view(-1)
    return "sha256:" + hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()


def received_fingerprint(data: torch.Tensor, piece: Slice | None) -> str:
    """How an engine records what arrived for a tensor: its fingerprint, and for a shard-sliced tensor (`data`
    is then the slice) "@dim:start:length" naming the slice."""
    return fingerprint(data) + ("" if piece is None else f"@{piece.dim}:{piece.start}:{piece.length}")


def expected_fingerprint(tensor: torch.Tensor, received: str) -> str:
    """What `received` (a `received_fingerprint`) must read if it came from the whole `tensor`."""
    _, _, named = received.partition("@")
    if not named:
        return received_fingerprint(tensor, None)
    piece = Slice(*(int(x) for x in named.split(":")))
    return received_fingerprint(piece.of(tensor), piece)
