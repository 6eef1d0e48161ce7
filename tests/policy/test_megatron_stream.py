"""`MegatronPolicyWorker.iter_weights` / `refit_sources` / `weights_manifest` on CPU: the real methods, run by 4
gloo ranks (no megatron-core: the worker is made without its constructor and given each rank's converted
parameters).

What a refit relies on (it calls `iter_weights` on every policy rank at once): every rank yields the full HF
tensors, in `weights_manifest`'s order, bit-exactly; a replicated parameter comes from tp rank 0; and
`colocate.check.perturb` keeps every rank's stream the same (the ranks of a stage draw the same noise), so each
colocated engine gets what rank 0 exports.
"""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoConfig

from colocate.models.tiny import build_tiny_model
from colocate.policy.megatron import convert
from colocate.policy.megatron.layout import rank_coords

WORLD = 4
NORM = "decoder.layers.0.input_layernorm.weight"  # replicated over tensor ranks, on stage 0


class _Module:
    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: torch.nn.Parameter(v, requires_grad=False) for k, v in state.items()}

    def named_parameters(self):
        return iter(self.state.items())

    def parameters(self):
        return iter(self.state.values())


class _Model:  # what the worker reads of Megatron's DDP wrapper: .module and .parameters()
    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.module = _Module(state)

    def parameters(self):
        return self.module.parameters()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _groups(rank: int, tp: int, pp: int) -> tuple:
    """This rank's tensor and pipeline groups (every rank creates every group, in the same order)."""
    coords = {r: rank_coords(r, tp_size=tp, pp_size=pp, world_size=WORLD) for r in range(WORLD)}
    mine = coords[rank]
    tp_group = pp_group = None
    pp_ranks: list[int] = []
    for key in sorted({(c.dp, c.pp) for c in coords.values()}):
        ranks = [r for r, c in coords.items() if (c.dp, c.pp) == key]
        group = dist.new_group(ranks)
        if key == (mine.dp, mine.pp):
            tp_group = group
    for key in sorted({(c.tp, c.dp) for c in coords.values()}):
        ranks = sorted((r for r, c in coords.items() if (c.tp, c.dp) == key), key=lambda r: coords[r].pp)
        group = dist.new_group(ranks)
        if key == (mine.tp, mine.dp):
            pp_group, pp_ranks = group, ranks
    return mine, tp_group, pp_group, pp_ranks


def _rank(rank: int, port: int, path: str, out: str, tp: int, pp: int) -> None:
    from colocate.check import perturb
    from colocate.policy.megatron.worker import MegatronPolicyWorker

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        coords, tp_group, pp_group, pp_ranks = _groups(rank, tp, pp)
        hf = load_file(f"{path}/model.safetensors")
        dims = convert.dims_from_hf_config(AutoConfig.from_pretrained(path))
        w = MegatronPolicyWorker.__new__(MegatronPolicyWorker)
        w.rank, w.tp, w.pp, w.tp_rank, w.pp_rank = rank, tp, pp, coords.tp, coords.pp
        w.tp_group, w.pp_group, w.pp_ranks = tp_group, pp_group, pp_ranks
        w.dims, w.param_dtype, w.device = dims, torch.float32, torch.device("cpu")
        w._params_offloaded = w._optimizer_offloaded = False
        w.model = _Model(convert.megatron_state(hf.__getitem__, dims, tp_size=tp, tp_rank=coords.tp,
                                                pp_size=pp, pp_rank=coords.pp))

        # 1. The checkpoint, in the manifest's order, names, shapes and dtype, cast bit-exactly.
        manifest = w.weights_manifest(torch.bfloat16)
        stream = [(name, t.clone()) for name, t in w.iter_weights(torch.bfloat16)]
        assert [n for n, _ in stream] == [n for n, _, _ in manifest] == list(convert.hf_shapes(dims))
        for (name, t), (_, shape, dtype) in zip(stream, manifest, strict=True):
            assert t.dtype == dtype == torch.bfloat16 and tuple(t.shape) == shape, name
            assert torch.equal(t, hf[name].to(torch.bfloat16)), f"rank {rank}: {name}"
        assert [n for n, _, _ in w.weights_manifest()] == [n for n, _ in stream]
        assert all(d == torch.float32 for _, _, d in w.weights_manifest())

        # 1b. As a refit runs the fills: a sender takes a whole bucket's sources before filling any (rank 0 here,
        # 7 at a time), a rank that only gathers fills each as it comes. Each fill writes its weight, the same
        # bits, into the place given, however far the generator has moved on.
        it, ahead, filled = w.refit_sources(torch.bfloat16), (7 if rank == 0 else 1), []
        while batch := list(itertools.islice(it, ahead)):
            for name, fill in batch:
                place = torch.full(fill.shape, float("nan"), dtype=fill.dtype)
                fill(place)
                filled.append((name, place))
        assert [n for n, _ in filled] == [n for n, _ in stream]
        for (name, t), (_, want) in zip(filled, stream, strict=True):
            assert torch.equal(t, want), f"rank {rank}: {name}"

        # 2. Perturbed (as colocate.check does), and a replicated norm made to differ on tp rank 1: every rank
        # streams the same weights (tp rank 0's norm), which is what each colocated engine receives.
        assert perturb(w, 0, 0.05) == len(w.model.module.state)
        if coords.tp == 1 and NORM in w.model.module.state:
            with torch.no_grad():
                w.model.module.state[NORM].add_(1.0)
        torch.save(dict(w.iter_weights()), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Qwen2 with tied embeddings and qkv biases (as Qwen2.5-1.5B): the last stage's embedding copy is not sent.
    return build_tiny_model(tmp_path_factory.mktemp("stream") / "qwen2", arch="qwen2", tie_word_embeddings=True,
                            num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256,
                            vocab_size=512)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("tp", "pp"), [(2, 2), (1, 2), (2, 1)], ids=["tp2-pp2", "tp1-pp2-dp2", "tp2-dp2"])
def test_every_rank_streams_the_full_checkpoint_in_manifest_order(model_path: Path, tmp_path: Path, tp: int,
                                                                   pp: int) -> None:
    torch.multiprocessing.spawn(_rank, args=(_free_port(), str(model_path), str(tmp_path), tp, pp), nprocs=WORLD)
    hf = load_file(f"{model_path}/model.safetensors")
    streams = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert all(list(s) == list(streams[0]) for s in streams)
    for name in streams[0]:
        assert all(torch.equal(s[name], streams[0][name]) for s in streams[1:]), name
    moved = [n for n, t in streams[0].items() if not torch.equal(t, hf[n])]
    assert len(moved) == len(hf), sorted(set(hf) - set(moved))
