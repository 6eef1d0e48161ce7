"""One-copy refit of weights that live inside a parameter of another layout (`refit/folded.py`): Megatron's
q, k and v, strided views of its interleaved linear_qkv, read in place by the engine. On CPU tensors standing in
for the sender's shared CUDA storage (the receiving half, `RefitReceiver._load_direct`, and the engine's loaders;
sharing a storage needs CUDA: the whole path runs in tests/test_refit_gpu.py and the Megatron GPU runs)."""

from __future__ import annotations

import re

import pytest
import torch

from colocate.engine.direct_load import DirectLoader
from colocate.policy.megatron.convert import Dims, interleave_qkv, qkv_group_views
from colocate.refit.checksum import fingerprint
from colocate.refit.errors import RefitFrameError
from colocate.refit.folded import FoldedTensor, fold_into, unfold
from colocate.refit.ipc import wire
from colocate.refit.ipc.jobdir import new_job_dir, new_token
from colocate.refit.ipc.receiver import RefitReceiver
from colocate.refit.plan import plan
from tests.test_direct_load import _Model
from tests.test_refit_direct import _Opened

# _Model's qkv_proj: q 8 rows, k 4, v 4 over 8 columns. Two kv groups of one 2-wide head each, two q heads a group.
DIMS = Dims(num_layers=1, hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=2, intermediate_size=16,
            vocab_size=40, qkv_bias=False, qk_norm=False, tied=True)
QKV = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
ROWS = (8, 4, 4)


def _megatron_storage(dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[wire.Source]]:
    """A storage holding a norm and an interleaved qkv after it (as Megatron's DDP buffer holds parameters), the
    HF tensors it stands for, and the sources a sender names for them (`RefitSender._share_resident`)."""
    g = torch.Generator().manual_seed(0)
    hf = {"norm": torch.randn(8, generator=g)}
    hf |= {n: torch.randn(rows, 8, generator=g) for n, rows in zip(QKV, ROWS, strict=True)}
    hf = {n: t.to(dtype) for n, t in hf.items()}
    storage = torch.cat([hf["norm"], interleave_qkv(*(hf[n] for n in QKV), DIMS).view(-1)])
    qkv = storage[8:].view(16, 8)
    views = dict(zip(QKV, qkv_group_views(qkv, DIMS), strict=True))
    name = str(dtype).removeprefix("torch.")
    sources = [wire.Source("s0", 0, name)]
    for n in QKV:
        v = views[n]
        assert torch.equal(v.reshape(hf[n].shape), hf[n])
        sources.append(wire.Source("s0", v.storage_offset() * v.element_size(), name, tuple(v.shape), v.stride()))
    return storage, hf, sources


def _receiver(storage: torch.Tensor, load_fn) -> RefitReceiver:
    receiver = RefitReceiver(job_dir=new_job_dir(), token=new_token(), load_fn=load_fn)
    receiver.cache._open["s0"] = _Opened(storage)
    return receiver


MANIFEST = plan([("norm", "bfloat16", (8,)), *((n, "bfloat16", (rows, 8)) for n, rows in zip(QKV, ROWS, strict=True))],
                1 << 20)


@pytest.mark.parametrize("source_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32-master-cast"])
def test_the_engine_copies_q_k_v_straight_out_of_the_interleaved_parameter(source_dtype):
    storage, hf, sources = _megatron_storage(source_dtype)
    model = _Model()
    loader = DirectLoader(model)
    handed: dict[str, torch.Tensor] = {}

    def load(weights, dtype=None):
        handed.update(weights)
        loader.load(weights, dtype=dtype)

    receiver = _receiver(storage, load)
    try:
        for step in range(2):  # the second refit reuses the views and the loader's plan; values changed in place
            if step:
                storage.mul_(2)
                hf = {n: t * 2 for n, t in hf.items()}
            receiver._load_direct(MANIFEST, bytearray(4), wire.Direct(1, 1, [], sources), MANIFEST.digest())
            want = {n: t.bfloat16() for n, t in hf.items()}
            assert torch.equal(model.qkv_proj.weight, torch.cat([want[n] for n in QKV]))
            assert torch.equal(model.norm, want["norm"])
            assert model.loaded_by_vllm == []  # every tensor placed by the direct loader, none handed to vLLM's
        # q, k, v arrive folded (their views are [groups, rows of a group, 8]); the norm as a plain view.
        assert all(isinstance(handed[n], FoldedTensor) and handed[n].shape == hf[n].shape for n in QKV)
        assert not isinstance(handed["norm"], FoldedTensor)
        assert handed["q_proj.weight"].folded.untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
    finally:
        receiver.close()


def test_other_loaders_get_the_plain_tensor():
    """vLLM's own loader (and a fingerprint, or any op) sees an ordinary tensor of the weight's shape."""
    storage, hf, sources = _megatron_storage(torch.bfloat16)
    got: dict[str, torch.Tensor] = {}
    receiver = _receiver(storage, lambda weights: got.update((n, unfold(t)) for n, t in weights))
    try:
        receiver._load_direct(MANIFEST, bytearray(4), wire.Direct(1, 1, [], sources), MANIFEST.digest())
    finally:
        receiver.close()
    for name, t in hf.items():
        assert type(got[name]) is torch.Tensor and torch.equal(got[name], t), name

    q = FoldedTensor((8, 8), qkv_group_views(storage[8:].view(16, 8), DIMS)[0])
    assert fingerprint(q) == fingerprint(hf["q_proj.weight"])
    assert torch.equal(q.narrow(0, 4, 4), hf["q_proj.weight"][4:])  # what a TP loader does: on the plain tensor
    assert torch.equal(q.clone(), hf["q_proj.weight"]) and type(q.clone()) is torch.Tensor
    assert isinstance(q.to(torch.float32), FoldedTensor) and torch.equal(unfold(q.float()), hf["q_proj.weight"].float())
    assert torch.zeros(8, 8, dtype=torch.bfloat16).copy_(q).equal(hf["q_proj.weight"])
    assert fold_into(torch.zeros(8, 8).t(), q) is None  # no view of a transposed destination: vLLM's loader
    with pytest.raises(ValueError, match="cannot stand for"):
        FoldedTensor((8, 9), q.folded)


def test_a_strided_source_outside_its_storage_or_of_another_size_is_refused():
    storage, _, sources = _megatron_storage(torch.bfloat16)
    receiver = _receiver(storage, lambda weights: None)
    bad = {
        "outside storage": wire.Source("s0", 200, "bfloat16", (2, 4, 8), (64, 8, 1)),  # to element 196 of 136
        "not (8, 8)'s 64": wire.Source("s0", 16, "bfloat16", (2, 3, 8), (64, 8, 1)),
    }
    try:
        for match, source in bad.items():
            broken = [sources[0], source, *sources[2:]]
            with pytest.raises(RefitFrameError, match=re.escape(match)):
                receiver._load_direct(MANIFEST, bytearray(4), wire.Direct(1, 1, [], broken), MANIFEST.digest())
    finally:
        receiver.close()
