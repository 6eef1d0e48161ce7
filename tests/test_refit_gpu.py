"""GPU: the colocated refit over CUDA IPC, two processes on one GPU, and into a vLLM engine.

Skipped without CUDA (CI); run on the device machine with `pytest -m gpu`.
"""

from __future__ import annotations

import multiprocessing as mp
import shutil

import pytest
import torch

from colocate.refit.ipc.jobdir import new_job_dir, new_token
from colocate.refit.plan import tensor_meta

pytestmark = pytest.mark.gpu
CTX = mp.get_context("spawn")


def _gpu_receiver(conn, job_dir, token, refits):
    import faulthandler
    import traceback

    from colocate.refit.ipc.receiver import RefitReceiver

    faulthandler.enable()  # a crash of this child shows in the test's output, not as a reset pipe alone
    got = {}

    def load(weights):
        for n, t in weights:
            got[n] = t.clone()

    try:
        r = RefitReceiver(job_dir=job_dir, token=token, load_fn=load, timeout_s=60)
        conn.send(r.address)
        for _ in range(refits):
            r.receive()
            # Raw bytes, not tensors: a CPU tensor sent over a Pipe goes through shared memory that the
            # child may tear down as it exits.
            conn.send({n: (str(t.dtype), tuple(t.shape), t.cpu().contiguous().view(-1).view(torch.uint8)
                           .numpy().tobytes()) for n, t in got.items()})
            got.clear()
        conn.send(len(r.cache))
        r.close()
    except BaseException:
        conn.send(("receiver failed", traceback.format_exc()))
        raise


def _tensors():
    g = torch.Generator(device="cuda").manual_seed(0)
    out = [(f"w{i}", torch.randn(n, 257, device="cuda", generator=g).to(torch.bfloat16)) for i, n in
           enumerate([3, 1000, 17, 4096, 5])]
    out.append(("big", torch.randn(8192, 1024, device="cuda", generator=g)))  # 32 MiB: oversized below
    out.append(("strided", torch.randn(64, 48, device="cuda", generator=g).t()))
    return out


@pytest.mark.parametrize("per_tensor", [False, True])
def test_cuda_ipc_stream_is_bit_identical(per_tensor):
    from colocate.refit.ipc.sender import RefitSender

    job_dir, token = new_job_dir(), new_token()
    conn, child = CTX.Pipe()
    proc = CTX.Process(target=_gpu_receiver, args=(child, job_dir, token, 3), daemon=True)
    proc.start()
    address = conn.recv()
    sent = _tensors()
    s = RefitSender(address=address, token=token, job_dir=job_dir, device="cuda", buffer_bytes=1 << 20,
                    timeout_s=60, verify=True, per_tensor=per_tensor)
    for _ in range(3):
        s.stream(iter(sent), tensor_meta(sent))
        got = conn.recv()
        assert isinstance(got, dict), got
        assert list(got) == [n for n, _ in sent]
        for n, t in sent:
            want = t.cpu().contiguous()
            assert got[n] == (str(want.dtype), tuple(want.shape), want.view(-1).view(torch.uint8).numpy().tobytes()), n
    assert conn.recv() == (0 if per_tensor else 2)  # ping-pong handles opened once, kept across refits
    s.close()
    proc.join(30)
    shutil.rmtree(job_dir, ignore_errors=True)


def test_one_copy_stream_reads_the_senders_tensors_in_place():
    """One-copy refit: the receiver reads the sender's own storages (a fp32 source for a bf16 entry is cast
    on the way in); in-place changes show at the next refit; a storage replaced is re-shared, the old one let
    go; the result is always bit-identical to a cast on the sender."""
    from colocate.refit.ipc.sender import RefitSender

    job_dir, token = new_job_dir(), new_token()
    conn, child = CTX.Pipe()
    proc = CTX.Process(target=_gpu_receiver, args=(child, job_dir, token, 3), daemon=True)
    proc.start()
    address = conn.recv()
    g = torch.Generator(device="cuda").manual_seed(3)
    sent = [(n, t) for n, t in _tensors() if t.is_contiguous()]
    sent.append(("master", torch.randn(300, 64, device="cuda", generator=g)))  # fp32, for a bf16 entry
    meta = [(n, "bfloat16" if n == "master" else d, s) for n, d, s in tensor_meta(sent)]
    s = RefitSender(address=address, token=token, job_dir=job_dir, device="cuda", buffer_bytes=1 << 20,
                    timeout_s=60)
    assert s.one_copy(sent)
    for refit in range(3):
        if refit == 1:
            for _, t in sent:
                t.mul_(2)  # an optimizer step: in place
        if refit == 2:
            sent[0] = (sent[0][0], sent[0][1].clone() + 1)  # a storage replaced
        stats = s.stream(iter(sent), meta, resident=sent)
        assert stats.one_copy
        assert conn.poll(60)
        got = conn.recv()
        assert isinstance(got, dict), got
        for n, t in sent:
            want = (t.to(torch.bfloat16) if n == "master" else t).cpu().contiguous()
            assert got[n] == (str(want.dtype), tuple(want.shape), want.view(-1).view(torch.uint8).numpy().tobytes()), n
        assert len(s._shared) == len({t.untyped_storage().data_ptr() for _, t in sent})
    assert conn.poll(60) and conn.recv() == len(s._shared)  # the replaced storage was let go by the receiver too
    s.close()
    proc.join(30)
    shutil.rmtree(job_dir, ignore_errors=True)


def test_one_copy_reads_views_of_other_layouts_in_place():
    """Weights inside parameters of another layout (Megatron's q, k, v in its interleaved linear_qkv: strided
    views of other shapes; a transposed tensor) are read in place and arrive as the tensors they stand for,
    also after the parameters change in place."""
    from colocate.policy.megatron.convert import Dims, interleave_qkv, qkv_group_views
    from colocate.refit.ipc.sender import RefitSender

    job_dir, token = new_job_dir(), new_token()
    conn, child = CTX.Pipe()
    proc = CTX.Process(target=_gpu_receiver, args=(child, job_dir, token, 2), daemon=True)
    proc.start()
    address = conn.recv()
    dims = Dims(num_layers=1, hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32, intermediate_size=64,
                vocab_size=64, qkv_bias=False, qk_norm=False, tied=True)
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(r, 256, device="cuda", generator=g).bfloat16() for r in (256, 64, 64))
    qkv = interleave_qkv(q, k, v, dims)
    norm_t = torch.randn(256, 64, device="cuda", generator=g).bfloat16()
    resident = [*zip(("q", "k", "v"), qkv_group_views(qkv, dims), strict=True), ("t", norm_t.t())]
    meta = [(n, "bfloat16", s) for n, s in (("q", (256, 256)), ("k", (64, 256)), ("v", (64, 256)), ("t", (64, 256)))]
    s = RefitSender(address=address, token=token, job_dir=job_dir, device="cuda", buffer_bytes=1 << 20,
                    timeout_s=60)
    assert s.one_copy(resident)
    for refit in range(2):
        if refit:
            qkv.mul_(2)
            norm_t.add_(1)
        stats = s.stream(iter([]), meta, resident=resident)
        assert stats.one_copy
        assert conn.poll(60)
        got = conn.recv()
        assert isinstance(got, dict), got
        for (n, view), (_, _, shape) in zip(resident, meta, strict=True):
            want = view.reshape(shape).cpu().contiguous()
            assert got[n] == ("torch.bfloat16", shape, want.view(-1).view(torch.uint8).numpy().tobytes()), n
    assert len(s._shared) == 2  # qkv's storage once for its three views, and the transposed tensor's
    assert conn.poll(60) and conn.recv() == 2
    s.close()
    proc.join(30)
    shutil.rmtree(job_dir, ignore_errors=True)


def _gpu_sender(conn, address, job_dir, token, one_copy):
    """Streams the checkpoint at each path it is sent (CUDA IPC needs two processes), replies fingerprints.
    `one_copy`: the engine reads fp32 copies of the tensors in place, casting them to the checkpoint's bf16;
    written in place from the second refit on (as an optimizer step does), so that refit takes the sender's
    and the engine's cached path (same sources, same views, the loader's plan kept with them)."""
    from safetensors.torch import load_file

    from colocate.refit.checksum import fingerprint
    from colocate.refit.ipc.sender import RefitSender

    sender = RefitSender(address=address, token=token, job_dir=job_dir, device="cuda", buffer_bytes=1 << 20,
                         timeout_s=60)
    resident = None
    while (path := conn.recv()) is not None:
        tensors = [(n, t.cuda()) for n, t in load_file(f"{path}/model.safetensors").items()]
        if one_copy and resident is None:
            resident = [(n, t.float()) for n, t in tensors]
        elif one_copy:
            for (_, dst), (_, src) in zip(resident, tensors, strict=True):
                dst.copy_(src)
        stats = sender.stream(iter(tensors), tensor_meta(tensors), resident=resident)
        assert stats.one_copy == one_copy
        conn.send({n: fingerprint(t) for n, t in tensors})
    sender.close()


@pytest.mark.parametrize("one_copy", [False, True])
def test_refit_into_vllm_on_gpu_reproduces_the_engine(tmp_path, one_copy):
    """An engine started from model A and refit to B decodes exactly as an engine started from B."""
    from vllm import SamplingParams

    from colocate.engine.vllm_engine import make_llm, shutdown_llm
    from colocate.models.tiny import build_tiny_model

    a = build_tiny_model(tmp_path / "a", seed=0, dtype="bfloat16")
    b = build_tiny_model(tmp_path / "b", seed=1, dtype="bfloat16")
    params = SamplingParams(temperature=0.0, max_tokens=16)
    prompts = [{"prompt_token_ids": ids} for ids in ([1, 5, 9, 33], [7, 7, 2], [100, 4, 250, 3, 9])]
    llm = make_llm(str(b), dtype="bfloat16", kv_cache_memory_bytes=256 << 20,
                   worker_extension_cls="colocate.refit.engine_side.RefitExtension")

    def greedy():
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    want_b = greedy()
    job_dir, token = new_job_dir(), new_token()
    [info] = llm.collective_rpc("colocate_refit_open", args=("zmq",), kwargs=dict(
        job="test-gpu", token=token, job_dir=job_dir, timeout_s=60.0, record=True))
    address = info["address"]
    conn, child = CTX.Pipe()
    proc = CTX.Process(target=_gpu_sender, args=(child, address, job_dir, token, one_copy), daemon=True)
    proc.start()

    def refit(path):
        conn.send(str(path))
        llm.collective_rpc("colocate_refit_receive")
        llm.reset_prefix_cache()
        assert conn.poll(60), "the sender process sent no fingerprints (it failed: see its traceback above)"
        return conn.recv()

    refit(a)
    assert greedy() != want_b
    sent_b = refit(b)
    [received] = llm.collective_rpc("colocate_received_fingerprints")
    assert received == sent_b
    assert greedy() == want_b
    conn.send(None)
    proc.join(30)
    llm.collective_rpc("colocate_refit_close")
    shutdown_llm(llm)
    shutil.rmtree(job_dir, ignore_errors=True)


def test_in_training_benchmark_on_gpu(tmp_path):
    """A one-rank FSDP2 policy into a vLLM engine on the GPU: the default path is the one-copy refit (the
    engine casting from the fp32 parameters), and every path delivers the policy's current weights."""
    import json
    import subprocess
    import sys

    out = tmp_path / "training.json"
    subprocess.run([sys.executable, "-m", "colocate.bench.refit", "--device", "cuda", "--model", "tiny",
                    "--policy", "fsdp2", "--repeats", "3", "--json", str(out)], check=True, timeout=600)
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    for name, r in rows.items():
        assert r["correct"] is True, (name, r.get("error"))
    assert rows["policy"]["one_copy"] and not rows["policy_buffered"]["one_copy"]
