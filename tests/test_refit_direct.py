"""The receiving half of the one-copy refit (`RefitReceiver._load_direct`), on CPU tensors standing in for the
sender's shared CUDA storages (opening them needs CUDA: the whole path runs in tests/test_refit_gpu.py):
views at the sources' offsets, the cast of a wider float by a loader that takes `dtype=` (or here, for one
that does not), and a source that lies outside its storage refused with the transport's named error."""

from __future__ import annotations

import pytest
import torch

from colocate.refit.errors import RefitFrameError
from colocate.refit.ipc import wire
from colocate.refit.ipc.buffers import Handle
from colocate.refit.ipc.jobdir import new_job_dir, new_token
from colocate.refit.ipc.receiver import RefitReceiver
from colocate.refit.plan import plan


class _Opened:  # what BufferCache keeps for a storage the sender shared
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.view(-1).view(torch.uint8)
        self.handle = Handle("s0", self.tensor.numel())
        self.views: dict = {}

    def close(self) -> None:
        pass


def _setup(load_fn):
    g = torch.Generator().manual_seed(0)
    storage = torch.randn(1000, generator=g)  # fp32 "master weights", two of them in one storage
    a, b = storage[:600].view(20, 30), storage[600:1000].view(40, 10)
    manifest = plan([("a", "bfloat16", (20, 30)), ("b", "bfloat16", (40, 10))], 1 << 20)
    receiver = RefitReceiver(job_dir=new_job_dir(), token=new_token(), load_fn=load_fn)
    receiver.cache._open["s0"] = _Opened(storage)
    sources = [wire.Source("s0", 0, "float32"), wire.Source("s0", 600 * 4, "float32")]
    return receiver, manifest, sources, {"a": a.bfloat16(), "b": b.bfloat16()}


@pytest.mark.parametrize("loader_casts", [True, False])
def test_direct_load_views_the_sources_and_casts(loader_casts):
    got: dict[str, torch.Tensor] = {}
    calls: list[torch.dtype | None] = []

    def casting_load(weights, dtype=None):
        calls.append(dtype)
        got.update((n, t.to(dtype) if dtype is not None else t.clone()) for n, t in weights)

    def plain_load(weights):
        calls.append(None)
        got.update((n, t.clone()) for n, t in weights)

    receiver, manifest, sources, want = _setup(casting_load if loader_casts else plain_load)
    try:
        seen = bytearray(2)
        receiver._load_direct(manifest, seen, wire.Direct(1, 1, [], sources), manifest.digest())
        assert seen == bytearray(b"\x01\x01")
        assert calls == [torch.bfloat16 if loader_casts else None]  # the loader casts, or is handed bf16
        for name, t in want.items():
            assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], t), name
    finally:
        receiver.close()


def test_direct_load_refuses_a_source_outside_its_storage():
    receiver, manifest, sources, _ = _setup(lambda weights: None)
    try:
        sources[1] = wire.Source("s0", 700 * 4, "float32")  # 400 floats from 700: past the storage's 1000
        with pytest.raises(RefitFrameError, match="outside storage"):
            receiver._load_direct(manifest, bytearray(2), wire.Direct(1, 1, [], sources), manifest.digest())
        sources[1] = wire.Source("s0", 600 * 4, "int32")
        with pytest.raises(RefitFrameError, match="expected bfloat16"):
            receiver._load_direct(manifest, bytearray(2), wire.Direct(1, 1, [], sources), manifest.digest())
    finally:
        receiver.close()
