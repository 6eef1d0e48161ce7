"""Byte buffers one process fills and another on the same device reads, named by a wire-safe handle.

- CUDA: a device allocation shared by CUDA IPC. The handle holds the fields of `_share_cuda_()`; the receiver
  opens it on its own device index (found by the device's UUID, since CUDA_VISIBLE_DEVICES may differ).
- CPU: a file in the job's private tmpfs directory, mapped by both processes.

Same interface on both: `SendBuffer.tensor` (flat uint8) and `SendBuffer.handle` on the sender;
`open_buffer(handle)` -> `OpenedBuffer.tensor` on the receiver. Opening is the slow part (cudaIpcOpenMemHandle,
mmap), so the receiver caches opened buffers by `handle.id` across buckets and refits (`BufferCache`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

import msgspec
import torch

from colocate.refit.ipc.jobdir import random_name


class CudaIpc(msgspec.Struct, frozen=True):
    device_uuid: str
    handle: bytes
    size_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool


class Handle(msgspec.Struct, frozen=True):
    """Names a buffer on the wire. `id` is unique per allocation; `temporary` buffers are not cached."""

    id: str
    nbytes: int
    temporary: bool = False
    byte_offset: int = 0
    shm_name: str | None = None
    cuda: CudaIpc | None = None


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_cuda_index(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    raise RuntimeError(f"CUDA device {uuid} is not visible in this process")


class SendBuffer:
    """A buffer the sender owns. `close()` frees it (CPU: unlinks the file)."""

    def __init__(self, nbytes: int, *, device: torch.device, job_dir: str, temporary: bool = False,
                 share: torch.Tensor | None = None) -> None:
        self.nbytes = nbytes
        self._mm: mmap.mmap | None = None
        self._path: Path | None = None
        if device.type == "cuda":
            # `share` lets a contiguous tensor go out as its own buffer, without a copy (oversized tensors,
            # and the naive per-tensor path).
            self.tensor = share if share is not None else torch.empty(nbytes, dtype=torch.uint8, device=device)
            byte_offset = self.tensor.storage_offset() * self.tensor.element_size()
            storage = self.tensor.untyped_storage()
            (_dev, h, size, off, rc_h, rc_off, ev_h, ev_sync) = storage._share_cuda_()
            cuda = CudaIpc(device_uuid(self.tensor.device.index), h, size, off, rc_h, rc_off, ev_h, ev_sync)
            self.handle = Handle(random_name("cuda"), nbytes, temporary, byte_offset, cuda=cuda)
        else:
            name = random_name("seg")
            self._path = Path(job_dir) / name
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, max(nbytes, 1))
                self._mm = mmap.mmap(fd, max(nbytes, 1))
            finally:
                os.close(fd)
            self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8, count=nbytes)
            self.handle = Handle(name, nbytes, temporary, shm_name=name)

    def close(self) -> None:
        self.tensor = None  # type: ignore[assignment]
        if self._mm is not None:
            _close_mmap(self._mm)
            self._mm = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None


class OpenedBuffer:
    """The receiver's view of a sender's buffer."""

    def __init__(self, handle: Handle, *, job_dir: str) -> None:
        self.handle = handle
        self._mm: mmap.mmap | None = None
        # Per (manifest digest, bucket): the (name, typed view) pairs the receiver builds into this buffer,
        # kept while the buffer stays open so a refit does not rebuild hundreds of them (RefitReceiver._load).
        self.views: dict[tuple[str, int], list[tuple[str, torch.Tensor]]] = {}
        if handle.cuda is not None:
            c = handle.cuda
            index = local_cuda_index(c.device_uuid)
            torch.cuda._lazy_init()
            storage = torch.UntypedStorage._new_shared_cuda(
                index, c.handle, c.size_bytes, c.offset_bytes, c.ref_counter_handle, c.ref_counter_offset,
                c.event_handle, c.event_sync_required,
            )
            typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.uint8, _internal=True)
            self.tensor = torch._utils._rebuild_tensor(typed, handle.byte_offset, (handle.nbytes,), (1,))
        else:
            name = handle.shm_name or ""
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"bad segment name {name!r}")
            fd = os.open(Path(job_dir) / name, os.O_RDWR)
            try:
                self._mm = mmap.mmap(fd, max(handle.nbytes, 1))
            finally:
                os.close(fd)
            self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8, count=handle.nbytes)

    def close(self) -> None:
        self.views.clear()
        self.tensor = None  # type: ignore[assignment]
        if self._mm is not None:
            _close_mmap(self._mm)
            self._mm = None


def _close_mmap(mm: mmap.mmap) -> None:
    # A view still exported (a tensor someone kept) makes close() raise; the mapping is then freed by the
    # garbage collector with the last view, and the file is already unlinked, so nothing leaks.
    with contextlib.suppress(BufferError):
        mm.close()


class BufferCache:
    """Opened buffers by handle id, kept across buckets and refits; temporary ones are closed after use."""

    def __init__(self, job_dir: str) -> None:
        self.job_dir = job_dir
        self._open: dict[str, OpenedBuffer] = {}

    def get(self, handle: Handle) -> OpenedBuffer:
        buf = self._open.get(handle.id)
        if buf is None:
            buf = OpenedBuffer(handle, job_dir=self.job_dir)
            if not handle.temporary:
                self._open[handle.id] = buf
        return buf

    def opened(self, buffer_id: str) -> OpenedBuffer | None:
        return self._open.get(buffer_id)

    def drop(self, ids: list[str] | None = None) -> None:
        for i in list(self._open) if ids is None else ids:
            buf = self._open.pop(i, None)
            if buf is not None:
                buf.close()

    def __len__(self) -> int:
        return len(self._open)
