"""The engine's direct loader (used on GPU, one TP rank): each HF tensor lands in its slice of vLLM's fused
parameters, a padded vocabulary keeps its padding, a wider float source is cast as it is copied, and anything
it cannot place goes to vLLM's own loader. The loader is device-agnostic; here it runs on CPU tensors."""

import pytest
import torch
from torch import nn

from colocate.engine import direct_load
from colocate.engine.direct_load import DirectLoader


class _Fused(nn.Module):
    def __init__(self, sizes: list[int], cols: int) -> None:
        super().__init__()
        self.output_sizes = sizes
        self.weight = nn.Parameter(torch.zeros(sum(sizes), cols, dtype=torch.bfloat16), requires_grad=False)


class _Model(nn.Module):
    """vLLM's naming: q/k/v fused into qkv_proj, gate/up into gate_up_proj, a vocabulary padded to 40 rows."""

    def __init__(self) -> None:
        super().__init__()
        self.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                       "gate_up_proj": ["gate_proj", "up_proj"]}
        self.embed_tokens = nn.Embedding(40, 8, dtype=torch.bfloat16).requires_grad_(False)
        self.qkv_proj = _Fused([8, 4, 4], 8)
        self.gate_up_proj = _Fused([16, 16], 8)
        self.norm = nn.Parameter(torch.zeros(8, dtype=torch.bfloat16), requires_grad=False)
        self.loaded_by_vllm: list[str] = []

    def load_weights(self, weights):
        self.loaded_by_vllm += [n for n, _ in weights]


@pytest.mark.parametrize("foreach_max_bytes", [direct_load.FOREACH_MAX_BYTES, 0, 64],
                         ids=["small-in-one-launch", "each-its-own-copy", "mixed"])
def test_direct_loader_places_every_tensor_exactly(monkeypatch, foreach_max_bytes):
    monkeypatch.setattr(direct_load, "FOREACH_MAX_BYTES", foreach_max_bytes)
    model = _Model()
    loader = DirectLoader(model)
    g = torch.Generator().manual_seed(0)
    fp32 = {"embed_tokens.weight": torch.randn(37, 8, generator=g), "q_proj.weight": torch.randn(8, 8, generator=g),
            "k_proj.weight": torch.randn(4, 8, generator=g), "v_proj.weight": torch.randn(4, 8, generator=g),
            "gate_proj.weight": torch.randn(16, 8, generator=g), "up_proj.weight": torch.randn(16, 8, generator=g),
            "norm": torch.randn(8, generator=g)}
    model.embed_tokens.weight.fill_(7)  # the padding rows must keep it
    for dtype in (None, torch.bfloat16):  # bf16 sources as they are; fp32 sources cast on the way in
        weights = [(n, t.bfloat16() if dtype is None else t) for n, t in fp32.items()]
        weights.append(("unknown.weight", torch.ones(3)))
        loader.load(weights, dtype=dtype)
        want = {n: t.bfloat16() for n, t in fp32.items()}
        assert torch.equal(model.qkv_proj.weight, torch.cat([want["q_proj.weight"], want["k_proj.weight"],
                                                             want["v_proj.weight"]]))
        assert torch.equal(model.gate_up_proj.weight, torch.cat([want["gate_proj.weight"], want["up_proj.weight"]]))
        assert torch.equal(model.embed_tokens.weight[:37], want["embed_tokens.weight"])
        assert (model.embed_tokens.weight[37:] == 7).all()
        assert torch.equal(model.norm, want["norm"])
        assert model.loaded_by_vllm[-1] == "unknown.weight"
        model.qkv_proj.weight.zero_()


def test_same_views_are_planned_once_and_each_load_copies_their_current_values():
    """The one-copy refit hands over the same views every refit (`SameViews`): the loader works out where
    each goes once, keeps it with the list, and every load copies what the views hold now; the plan dies
    with the list (it must not keep the sender's storages open)."""
    import gc
    import weakref

    from colocate.refit.schedule import SameViews

    model = _Model()
    loader = DirectLoader(model)
    src = {"q_proj.weight": torch.zeros(8, 8, dtype=torch.bfloat16), "norm": torch.zeros(8, dtype=torch.bfloat16),
           "unknown.weight": torch.ones(3)}
    views = SameViews(src.items())
    planned = []
    real_plan = loader._plan
    loader._plan = lambda w, d: planned.append(1) or real_plan(w, d)
    for value in (1.0, 2.0, 3.0):
        for t in src.values():
            t.fill_(value)  # the sender writes its storages in place between refits
        loader.load(views)
        assert (model.qkv_proj.weight[:8] == value).all() and (model.norm == value).all()
        assert model.loaded_by_vllm[-1] == "unknown.weight"
    assert len(planned) == 1
    loader.load(list(views))  # a plain list: planned each time
    assert len(planned) == 2
    held = weakref.ref(src.pop("q_proj.weight"))
    del views, src
    gc.collect()
    assert held() is None
