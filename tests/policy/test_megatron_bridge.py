"""`convert.py`'s QKV layout against Megatron-Bridge's own code (issue #12: check the conversion against Bridge).

Bridge (megatron-bridge 0.6.2, the converter NeMo-RL and verl use) needs Python 3.12 and pins transformers and
hydra versions this project does not use, so it is not installed: the Makefile downloads its wheel, without
dependencies, into .venv/reference, and this test takes `merge_qkv_weights`, `split_qkv_weights`,
`merge_qkv_biases` and `split_qkv_biases` out of its `megatron/bridge/models/conversion/param_mapping.py` by
their syntax tree and runs them as they are (they use torch only; the module's own imports need megatron-core).
They are checked against `interleave_qkv` / `split_qkv` and the views the one-copy refit reads
(`qkv_group_views`), on the tiny checkpoints' real tensors and on a grid of head layouts.
"""

from __future__ import annotations

import ast
import hashlib
import typing
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from colocate.models.tiny import build_tiny_model
from colocate.policy.megatron.convert import Dims, dims_from_hf_config, interleave_qkv, qkv_group_views, split_qkv

WHEEL = Path(__file__).resolve().parents[2] / ".venv" / "reference" / "megatron_bridge-0.6.2-py3-none-any.whl"
WHEEL_SHA256 = "bcb7274ab9327167c345aa24b96b95790ce5090df1945d883bdc41065d5649e2"  # PyPI's file, 2026-12-02
SOURCE = "megatron/bridge/models/conversion/param_mapping.py"
FUNCTIONS = ("merge_qkv_weights", "split_qkv_weights", "merge_qkv_biases", "split_qkv_biases")


@pytest.fixture(scope="module")
def bridge() -> dict[str, typing.Callable]:
    assert WHEEL.exists(), f"{WHEEL} is missing: `make install` downloads it (pip download --no-deps)"
    assert hashlib.sha256(WHEEL.read_bytes()).hexdigest() == WHEEL_SHA256  # the code this test was written against
    with zipfile.ZipFile(WHEEL) as wheel:
        tree = ast.parse(wheel.read(SOURCE).decode(), filename=SOURCE)
    picked = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in FUNCTIONS]
    assert sorted(n.name for n in picked) == sorted(FUNCTIONS)
    namespace: dict[str, typing.Any] = {"torch": torch, "TransformerConfig": typing.Any, "Optional": typing.Optional,
                                        "Tuple": tuple}
    exec(compile(ast.Module(body=picked, type_ignores=[]), SOURCE, "exec"), namespace)
    return {name: namespace[name] for name in FUNCTIONS}


def _provider(dims: Dims) -> SimpleNamespace:  # the TransformerConfig fields Bridge's functions read
    return SimpleNamespace(num_attention_heads=dims.num_heads, num_query_groups=dims.num_kv_heads,
                           kv_channels=dims.head_dim, hidden_size=dims.hidden_size)


def _check(bridge: dict, dims: Dims, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    kind = "biases" if q.dim() == 1 else "weights"
    provider = _provider(dims)
    ours = interleave_qkv(q, k, v, dims)
    assert torch.equal(ours, bridge[f"merge_qkv_{kind}"](provider, q, k, v))
    for mine, theirs, want in zip(split_qkv(ours, dims), bridge[f"split_qkv_{kind}"](provider, ours), (q, k, v),
                                  strict=True):
        assert torch.equal(mine, theirs) and torch.equal(mine, want)
    for view, want in zip(qkv_group_views(ours, dims), (q, k, v), strict=True):
        assert torch.equal(view.reshape(want.shape), want)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_qkv_layout_is_megatron_bridges_on_real_checkpoints(bridge, tmp_path: Path, arch: str) -> None:
    path = build_tiny_model(tmp_path / arch, arch=arch, num_layers=2, hidden_size=256, num_heads=8, num_kv_heads=2,
                            intermediate_size=256, vocab_size=512)
    dims = dims_from_hf_config(AutoConfig.from_pretrained(path))
    hf = load_file(f"{path}/model.safetensors")
    for i in range(dims.num_layers):
        attn = f"model.layers.{i}.self_attn."
        _check(bridge, dims, *(hf[f"{attn}{p}_proj.weight"] for p in "qkv"))
        if dims.qkv_bias:
            _check(bridge, dims, *(hf[f"{attn}{p}_proj.bias"] for p in "qkv"))


@pytest.mark.parametrize(("heads", "groups", "head_dim"), [(4, 4, 8), (8, 2, 4), (12, 4, 2), (6, 1, 3), (16, 8, 1)])
def test_qkv_layout_is_megatron_bridges_for_every_head_grouping(bridge, heads: int, groups: int,
                                                               head_dim: int) -> None:
    dims = Dims(num_layers=1, hidden_size=10, num_heads=heads, num_kv_heads=groups, head_dim=head_dim,
                intermediate_size=4, vocab_size=8, qkv_bias=True, qk_norm=False, tied=False)
    gen = torch.Generator().manual_seed(heads * 100 + groups)
    q, k, v = (torch.randn(n * head_dim, 10, generator=gen) for n in (heads, groups, groups))
    _check(bridge, dims, q, k, v)
    _check(bridge, dims, q[:, 0].contiguous(), k[:, 0].contiguous(), v[:, 0].contiguous())
