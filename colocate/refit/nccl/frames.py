"""The bytes of a split-placement refit on the wire: the header, each bucket's trailer, the manifest blob,
and the two bucket buffers each rank keeps.

Pure: no process group here; `receiver.py` documents the protocol, `sender.py` and `receiver.py` move
these bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import torch

from colocate.refit.errors import RefitFrameError, RefitManifestError
from colocate.refit.plan import Bucket, Manifest

MAGIC = 0x636F6C6F63617465  # "colocate"
OK, ABORT = 0, 1
TRAILER_WORDS = 4
TRAILER_BYTES = TRAILER_WORDS * 8

@dataclass(frozen=True)
class Header:
    refit_id: int
    status: int
    buckets: int
    manifest_bytes: int
    overlap: bool
    digest: str  # 16 hex digits (Manifest.digest)

    def words(self) -> list[int]:
        hi, lo = digest_words(self.digest)
        return [MAGIC, self.refit_id, self.status, self.buckets, self.manifest_bytes, int(self.overlap),
                hi, lo]

    @classmethod
    def from_words(cls, w: Sequence[int]) -> Header:
        if len(w) != 8 or w[0] != MAGIC:
            raise RefitFrameError(f"bad refit header {list(w)[:2]}...: the sender is no colocate BroadcastSender")
        return cls(w[1], w[2], w[3], w[4], bool(w[5]), words_digest(w[6], w[7]))


def digest_words(digest: str) -> tuple[int, int]:
    """A 16-hex-digit digest as two non-negative int64 words (the header is one int64 tensor)."""
    if len(digest) != 16:
        raise ValueError(f"digest must be 16 hex digits, got {digest!r}")
    return int(digest[:8], 16), int(digest[8:], 16)


def words_digest(hi: int, lo: int) -> str:
    return f"{hi:08x}{lo:08x}"


def trailer_offset(nbytes: int) -> int:
    """Where a bucket's trailer starts: after its bytes, 8-aligned so it can be read as int64."""
    return (nbytes + 7) // 8 * 8


def frame_bytes(nbytes: int) -> int:
    """Bytes on the wire for a bucket of `nbytes`: data, padding, trailer."""
    return trailer_offset(nbytes) + TRAILER_BYTES


def trailer_words(refit_id: int, bucket: int, status: int) -> list[int]:
    return [refit_id, bucket, status, MAGIC]


def encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.encode(manifest)


def decode_manifest(blob: bytes) -> Manifest:
    try:
        return msgspec.json.decode(blob, type=Manifest)
    except msgspec.DecodeError as e:
        raise RefitManifestError(f"unparsable manifest ({len(blob)} bytes): {e}") from None


def frame_buffers(buffers: list[torch.Tensor], manifest: Manifest, device: torch.device) -> list[torch.Tensor]:
    """The two buffers a rank alternates over for `manifest`'s regular buckets: `buffers` if they are big
    enough, else two new ones (the sender and every receiver hold the same pair)."""
    need = frame_bytes(max((b.nbytes for b in manifest.buckets if not b.oversized), default=0))
    if buffers and buffers[0].numel() >= need:
        return buffers
    return [torch.empty(need, dtype=torch.uint8, device=device) for _ in range(2)]


def write_trailer(buf: torch.Tensor, b: Bucket, words: list[int]) -> None:
    off = trailer_offset(b.nbytes)
    buf[off:off + TRAILER_BYTES].view(torch.int64).copy_(torch.tensor(words, dtype=torch.int64))


def read_trailer(buf: torch.Tensor, b: Bucket) -> list[int]:
    off = trailer_offset(b.nbytes)
    return buf[off:off + TRAILER_BYTES].view(torch.int64).tolist()
