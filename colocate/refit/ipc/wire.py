"""Messages of the colocated refit protocol, and their framing on a ZMQ socket.

A message is two frames: the job's token (raw bytes) and a msgspec-JSON header, a tagged union below. No
pickle anywhere: a frame that is not exactly that is rejected by `decode` and the receiver keeps serving.
Every header carries the refit id and a sequence number, so late replies from an aborted refit are
recognised and dropped. The state machine that uses these messages is documented in `receiver.py`.
"""

from __future__ import annotations

import hmac

import msgspec

from colocate.refit.ipc.buffers import Handle
from colocate.refit.plan import Manifest
from colocate.refit.slices import Slice


class Offer(msgspec.Struct, tag="offer"):
    """Sender -> receiver, before planning a layout (shard-sliced refit): the (name, dtype name, shape) of every
    tensor, in order. The receiver acks with the slice of each its engine's loader keeps (`Ack.slices`)."""

    refit_id: int
    seq: int
    meta: list[tuple[str, str, tuple[int, ...]]]


class Prepare(msgspec.Struct, tag="prepare"):
    """Sender -> receiver, once per model (or when the layout changes): the whole manifest."""

    refit_id: int
    seq: int
    manifest: Manifest


class Begin(msgspec.Struct, tag="begin"):
    refit_id: int
    seq: int
    digest: str
    verify: bool = False


class Load(msgspec.Struct, tag="load"):
    """Bucket `bucket` of the manifest is ready in `buffer`: load it, then ack `seq`."""

    refit_id: int
    seq: int
    bucket: int
    buffer: Handle
    checksums: list[int] | None = None


class Source(msgspec.Struct, frozen=True, array_like=True):
    """Where one manifest entry lives in the sender's own memory: `byte_offset` into the shared storage
    `buffer` (a handle id), of `dtype` (the entry's, or a float the engine casts from); contiguous in the
    entry's shape, or (`shape` and `stride`, in elements) a strided view whose elements in row-major order are
    the entry's (a weight inside a parameter of another layout: `refit/folded.py`)."""

    buffer: str
    byte_offset: int
    dtype: str
    shape: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None


class Direct(msgspec.Struct, tag="direct"):
    """One-copy refit: every entry of the manifest is read in place, `sources[i]` for entry i, from storages
    the sender shares (`share`: opened now, cached by id; earlier ones stay open). Ack once all is loaded:
    only then may the sender write those storages again."""

    refit_id: int
    seq: int
    share: list[Handle]
    sources: list[Source]


class Done(msgspec.Struct, tag="done"):
    refit_id: int
    seq: int
    buckets_sent: int


class Abort(msgspec.Struct, tag="abort"):
    """The sender failed mid-refit; the receiver raises the same error."""

    refit_id: int
    seq: int
    kind: str
    message: str
    traceback: str


class Release(msgspec.Struct, tag="release"):
    """The sender freed these buffers: drop the opened handles."""

    refit_id: int
    seq: int
    buffer_ids: list[str]


class Ack(msgspec.Struct, tag="ack"):
    refit_id: int
    seq: int
    checksums: list[int] | None = None
    slices: list[Slice | None] | None = None  # the answer to an Offer (None: every tensor whole)


class Error(msgspec.Struct, tag="error"):
    refit_id: int
    seq: int
    kind: str
    message: str
    traceback: str


ToReceiver = Offer | Prepare | Begin | Load | Direct | Done | Abort | Release
ToSender = Ack | Error

_enc = msgspec.json.Encoder()
_dec_receiver = msgspec.json.Decoder(ToReceiver)
_dec_sender = msgspec.json.Decoder(ToSender)


# The largest frame either side reads: ZMQ drops a peer announcing a bigger one before reading any of it
# (`zmq.MAXMSGSIZE`), so a stray or hostile local client cannot make the receiver buffer it. The largest
# legal frame is a Prepare: ~100 bytes per manifest entry, so this allows half a million tensors.
MAX_FRAME_BYTES = 64 << 20


class BadFrame(ValueError):
    """A frame without the job's token, or one that does not parse."""


def encode(token: bytes, msg: ToReceiver | ToSender) -> list[bytes]:
    return [token, _enc.encode(msg)]


def decode(token: bytes, frames: list[bytes], *, to_receiver: bool) -> ToReceiver | ToSender:
    if len(frames) != 2:
        raise BadFrame(f"expected 2 frames, got {len(frames)}")
    if not hmac.compare_digest(frames[0], token):
        raise BadFrame("wrong or missing job token")
    try:
        return (_dec_receiver if to_receiver else _dec_sender).decode(frames[1])
    except msgspec.DecodeError as e:
        raise BadFrame(f"unparsable header: {e}") from None
