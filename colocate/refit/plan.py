"""Pure planning for a refit: the manifest of tensors and their bucket layout.

Nothing here touches a transport. The sender and the receiver each build or receive the same `Manifest`,
and every other module (ZMQ/IPC, shared memory, broadcast) only moves the bytes this plan describes.

Layout rules:
- Tensors are packed in iteration order into buckets of at most `buffer_bytes`; each tensor starts at an
  offset aligned to `ALIGN` bytes so that the receiver's views are aligned for any dtype and vectorised copy.
- A tensor the engine keeps only a slice of (a tensor-parallel engine worker, `slices.py`) takes only that
  slice's bytes: its entry keeps the whole tensor's shape and says which `sliced` part travels.
- A tensor larger than one buffer gets a bucket of its own, flagged `oversized`: the sender stages it in a
  temporary buffer sized to it (a 1.7 GiB embedding does not fit a 1.6 GiB buffer, and splitting it would
  hand the engine a partial tensor).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import msgspec
import torch

from colocate.refit.errors import RefitManifestError
from colocate.refit.slices import Slice

ALIGN = 256

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise RefitManifestError(f"unsupported dtype {dtype}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise RefitManifestError(f"unknown dtype name {name!r}") from None


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """One tensor: where it lives in which bucket. `shape` is the whole tensor's; where only a slice of it
    travels, `sliced` says which and `nbytes` counts that slice."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    bucket: int
    offset: int
    nbytes: int
    sliced: Slice | None = None

    @property
    def wire_shape(self) -> tuple[int, ...]:
        """The shape of what travels: the slice's, or the whole tensor's."""
        return self.shape if self.sliced is None else self.sliced.shape(self.shape)


class Bucket(msgspec.Struct, frozen=True, array_like=True):
    """Entries [first, last) of the manifest, packed into `nbytes` bytes."""

    index: int
    first: int
    last: int
    nbytes: int
    oversized: bool


class Manifest(msgspec.Struct, frozen=True):
    """The whole model's layout for one buffer size. Sent once per model ("prepare")."""

    entries: tuple[Entry, ...]
    buckets: tuple[Bucket, ...]
    buffer_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def digest(self) -> str:
        """A short hash of the layout: both sides compare it before any bytes move."""
        return hashlib.sha256(msgspec.json.encode(self)).hexdigest()[:16]

    def index_of(self) -> dict[str, int]:
        return {e.name: i for i, e in enumerate(self.entries)}


# (name, dtype name, shape) of each tensor a refit will carry, in order: what a manifest is planned from.
Meta = Sequence[tuple[str, str, tuple[int, ...]]]


# Why an engine cannot take the tensors of a manifest (planned from this Meta), or None when it can.
CheckFn = Callable[[Meta], "str | None"]


def manifest_meta_of(entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]]
                     ) -> list[tuple[str, str, tuple[int, ...]]]:
    """Meta from a policy's `weights_manifest` rows, (name, shape, torch dtype): what a refit offers."""
    return [(n, dtype_name(d), tuple(s)) for n, s, d in entries]


def tensor_meta(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype name, shape) of each tensor, without touching its data."""
    return [(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in named]


def plan(meta: Sequence[tuple[str, str, tuple[int, ...]]], buffer_bytes: int, *,
         one_per_bucket: bool = False, slices: Sequence[Slice | None] | None = None) -> Manifest:
    """Pack tensors, given as (name, dtype name, shape), into buckets of at most `buffer_bytes` each.

    `one_per_bucket` gives every tensor a bucket of its own (the naive per-tensor path, for comparison).
    `slices`: per tensor, the part of it that travels (None: the whole tensor)."""
    if buffer_bytes < ALIGN:
        raise ValueError(f"buffer_bytes must be at least {ALIGN}, got {buffer_bytes}")
    if slices is not None and len(slices) != len(meta):
        raise RefitManifestError(f"{len(slices)} slices for {len(meta)} tensors")
    seen: set[str] = set()
    entries: list[Entry] = []
    buckets: list[Bucket] = []
    first, used = 0, 0

    def close(last: int, oversized: bool = False) -> None:
        nonlocal first, used
        if last > first:
            buckets.append(Bucket(len(buckets), first, last, used, oversized))
        first, used = last, 0

    for k, (name, dtype, shape) in enumerate(meta):
        if name in seen:
            raise RefitManifestError(f"duplicate tensor name {name!r}")
        seen.add(name)
        sliced = slices[k] if slices is not None else None
        if sliced is not None and not sliced.check(tuple(shape)):
            raise RefitManifestError(f"{name}: {sliced} is not a slice of a tensor of shape {tuple(shape)}")
        numel = 1
        for d in (shape if sliced is None else sliced.shape(tuple(shape))):
            numel *= d
        nbytes = numel * dtype_from_name(dtype).itemsize
        if nbytes > buffer_bytes or one_per_bucket:
            close(len(entries))
            entries.append(Entry(name, dtype, tuple(shape), len(buckets), 0, nbytes, sliced))
            used = nbytes
            close(len(entries), oversized=True)
            continue
        offset = align_up(used)
        if offset + nbytes > buffer_bytes:
            close(len(entries))
            offset = 0
        entries.append(Entry(name, dtype, tuple(shape), len(buckets), offset, nbytes, sliced))
        used = offset + nbytes
    close(len(entries))
    return Manifest(tuple(entries), tuple(buckets), buffer_bytes)


def bucket_views(buf_u8: torch.Tensor, entries: Sequence[Entry]) -> list[torch.Tensor]:
    """Typed views of each entry's bytes in a bucket's buffer (flat uint8): how both transports' senders
    pack and receivers read a bucket (of a sliced entry: its slice)."""
    return [buf_u8[e.offset:e.offset + e.nbytes].view(dtype_from_name(e.dtype)).view(e.wire_shape)
            for e in entries]


def check_tensor(entry: Entry, tensor: torch.Tensor) -> None:
    """Raise RefitManifestError if `tensor` is not what `entry` promises."""
    if tuple(tensor.shape) != entry.shape:
        raise RefitManifestError(f"{entry.name}: shape {tuple(tensor.shape)} != manifest {entry.shape}")
    if dtype_name(tensor.dtype) != entry.dtype:
        raise RefitManifestError(f"{entry.name}: dtype {dtype_name(tensor.dtype)} != manifest {entry.dtype}")


def next_matching(it: Iterator[tuple[str, torch.Tensor]], e: Entry, entries: Sequence[Entry], index: int
                  ) -> torch.Tensor:
    """The iterator's next tensor, checked against manifest entry `e` (the index-th)."""
    try:
        name, tensor = next(it)
    except StopIteration:
        missing = [x.name for x in entries[index:]]
        raise RefitManifestError(f"missing tensors: {missing[:5]}{'...' if len(missing) > 5 else ''}") from None
    if name != e.name:
        known = {x.name: i for i, x in enumerate(entries)}
        if name not in known:
            raise RefitManifestError(f"extra tensor {name!r} not in the manifest")
        if known[name] < index:
            raise RefitManifestError(f"duplicate tensor {name!r}")
        raise RefitManifestError(f"missing tensor {e.name!r} (got {name!r} in its place)")
    check_tensor(e, tensor)
    return tensor


def manifest_meta(manifest: Manifest) -> list[tuple[str, str, tuple[int, ...]]]:
    """The (name, dtype name, shape) list a manifest was planned from."""
    return [(e.name, e.dtype, tuple(e.shape)) for e in manifest.entries]


def expect(expected: Meta | Mapping[str, tuple[str, tuple[int, ...]]]) -> CheckFn:
    """A `CheckFn` accepting exactly these tensors, (name, dtype name, shape) or name -> (dtype name, shape),
    in any order (tests, and receivers outside an engine)."""
    rows = ((n, d, s) for n, (d, s) in expected.items()) if isinstance(expected, Mapping) else expected
    want = {n: (d, tuple(s)) for n, d, s in rows}

    def check(meta: Meta) -> str | None:
        got = {n: (d, tuple(s)) for n, d, s in meta}
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = [f"{n}: {got[n]} != expected {want[n]}" for n in sorted(set(got) & set(want)) if got[n] != want[n]]
        if not (missing or extra or wrong):
            return None
        return f"manifest does not match the engine: missing={missing[:5]} extra={extra[:5]} wrong={wrong[:5]}"

    return check
