"""Pure planning: bucket layout, alignment, oversized tensors, manifest digests."""

import pytest
import torch

from colocate.refit.errors import RefitManifestError
from colocate.refit.plan import ALIGN, align_up, check_tensor, plan


def meta(*sizes, dtype="float32"):
    return [(f"t{i}", dtype, (n,)) for i, n in enumerate(sizes)]


@pytest.mark.parametrize(
    "sizes, buffer_bytes, expect",  # expect: per bucket, (entry indices, oversized)
    [
        ((10, 10, 10), 1024, [((0, 1, 2), False)]),
        ((64, 64, 64), 512, [((0, 1), False), ((2,), False)]),  # 256 + 256 fits exactly
        ((65, 64), 512, [((0,), False), ((1,), False)]),  # 260 bytes pushes t1 to offset 512 > 512-256
        ((1000, 10), 512, [((0,), True), ((1,), False)]),  # 4000 bytes: its own, oversized
        ((10, 1000, 10), 512, [((0,), False), ((1,), True), ((2,), False)]),
        ((), 512, []),
    ],
)
def test_bucket_layout(sizes, buffer_bytes, expect):
    m = plan(meta(*sizes), buffer_bytes)
    got = [(tuple(range(b.first, b.last)), b.oversized) for b in m.buckets]
    assert got == expect
    for e in m.entries:
        assert e.offset % ALIGN == 0
        b = m.buckets[e.bucket]
        assert b.first <= m.entries.index(e) < b.last
        assert e.offset + e.nbytes <= (b.nbytes if b.oversized else buffer_bytes)


def test_offsets_are_aligned_and_disjoint():
    m = plan([("a", "bfloat16", (3,)), ("b", "float32", (5, 7)), ("c", "int8", (1,)), ("d", "bool", ())], 4096)
    assert [e.offset for e in m.entries] == [0, 256, 512, 768]
    assert [e.nbytes for e in m.entries] == [6, 140, 1, 1]
    assert m.total_bytes == 148
    assert align_up(1) == ALIGN and align_up(ALIGN) == ALIGN


def test_duplicate_names_rejected():
    with pytest.raises(RefitManifestError, match="duplicate"):
        plan([("a", "float32", (1,)), ("a", "float32", (1,))], 1024)


def test_digest_depends_on_layout():
    a = plan(meta(10, 20), 1024)
    assert a.digest() == plan(meta(10, 20), 1024).digest()
    assert a.digest() != plan(meta(10, 21), 1024).digest()
    assert a.digest() != plan(meta(10, 20), 512).digest()


def test_check_tensor():
    e = plan([("w", "bfloat16", (2, 3))], 1024).entries[0]
    check_tensor(e, torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(RefitManifestError, match="shape"):
        check_tensor(e, torch.zeros(3, 2, dtype=torch.bfloat16))
    with pytest.raises(RefitManifestError, match="dtype"):
        check_tensor(e, torch.zeros(2, 3, dtype=torch.float16))
