"""Split-placement refit by bucketed broadcast: pure helpers, the transport between real processes over
gloo, and end to end into two real vLLM CPU engines in Ray actors (bit-identical tensors, HF-identical
greedy outputs, a killed receiver or sender, a manifest mismatch, ten refits in a row, close and reopen).
"""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import ray
import torch
import torch.distributed as dist

from colocate.refit.checksum import fingerprint
from colocate.refit.driver import await_refit
from colocate.refit.errors import (
    RefitAuthError,
    RefitError,
    RefitManifestError,
    RefitPeerDiedError,
    RefitTimeoutError,
)
from colocate.refit.nccl.frames import (
    MAGIC,
    Header,
    decode_manifest,
    digest_words,
    encode_manifest,
    frame_bytes,
    trailer_offset,
    words_digest,
)
from colocate.refit.nccl.group import td
from colocate.refit.nccl.sender import BroadcastSender
from colocate.refit.plan import expect, manifest_meta, plan, tensor_meta
from colocate.rendezvous import get_rendezvous
from tests import broadcast_actors, hf_reference
from tests.broadcast_actors import EngineActor, SenderActor, checkpoint_tensors, expected_meta, to_bytes

CTX = mp.get_context("spawn")
TIMEOUT = 8.0
PROMPTS = ["Q: 12+7= A:", "Q: 93-40= A:", "The answer is"]
MAX_TOKENS = 12


# ---- pure helpers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [
    Header(1, 0, 3, 0, True, "0123456789abcdef"),
    Header(2**40, 1, 0, 12345, False, "ffffffffffffffff"),
    Header(7, 0, 1, 1, True, "0000000000000000"),
])
def test_header_roundtrip(header):
    words = header.words()
    assert len(words) == 8 and words[0] == MAGIC
    assert all(0 <= w < 2**63 for w in words)  # fits the int64 tensor it travels in
    assert Header.from_words(torch.tensor(words, dtype=torch.int64).tolist()) == header


def test_header_rejects_a_foreign_sender():
    with pytest.raises(RefitError, match="bad refit header"):
        Header.from_words([0, 1, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("digest", ["0123456789abcdef", "ffffffffffffffff", "0000000000000001"])
def test_digest_words_roundtrip(digest):
    assert words_digest(*digest_words(digest)) == digest


@pytest.mark.parametrize("nbytes, offset, frame", [(0, 0, 32), (1, 8, 40), (8, 8, 40), (255, 256, 288)])
def test_frame_layout(nbytes, offset, frame):
    assert trailer_offset(nbytes) == offset and frame_bytes(nbytes) == frame


def test_manifest_bytes_roundtrip():
    m = plan([("a", "float32", (3, 4)), ("b", "bfloat16", (5,)), ("c", "int64", ())], 256)
    back = decode_manifest(encode_manifest(m))
    assert back == m and back.digest() == m.digest()
    with pytest.raises(RefitManifestError, match="unparsable"):
        decode_manifest(b"{not json")


M = plan([("a", "float32", (3, 4)), ("b", "bfloat16", (5,))], 1024)


@pytest.mark.parametrize("expected, why", [
    (None, None),
    ({"a": ("float32", (3, 4)), "b": ("bfloat16", (5,))}, None),
    ({"a": ("float32", [3, 4]), "b": ("bfloat16", [5])}, None),  # shapes as lists (after JSON or Ray)
    ({"a": ("float32", (3, 4))}, "extra=['b']"),
    ({"a": ("float32", (3, 4)), "b": ("bfloat16", (5,)), "c": ("int8", (1,))}, "missing=['c']"),
    ({"a": ("float16", (3, 4)), "b": ("bfloat16", (5,))}, "a: ('float32', (3, 4)) != expected"),
    ({"a": ("float32", (4, 3)), "b": ("bfloat16", (5,))}, "!= expected ('float32', (4, 3))"),
])
def test_manifest_mismatch(expected, why):
    got = expect(expected)(manifest_meta(M)) if expected is not None else None
    assert got is None if why is None else why in got


# ---- the transport between processes (gloo, no engine) ------------------------------------------------

def odd_state(seed: int, rows: int = 64) -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes and sizes: a 0-d, an empty, a bool, a non-contiguous and an oversized tensor."""
    g = torch.Generator().manual_seed(seed)
    out = [(f"layers.{i}.w", torch.randn(rows, 48, generator=g)) for i in range(4)]
    out += [("bf16", torch.randn(37, 5, generator=g).to(torch.bfloat16)),
            ("scalar", torch.tensor(3.5 + seed)),
            ("ids", torch.arange(13) * seed), ("transposed", torch.randn(16, 24, generator=g).t()),
            ("empty", torch.empty(0, 3)), ("embed", torch.randn(300, 48, generator=g)),
            ("mask", torch.tensor([True, False, bool(seed % 2)]))]
    return out


# ---- the rendezvous store: one address, the job's token -------------------------------------------------

def test_the_store_listens_on_the_address_given_alone():
    import psutil

    sender = BroadcastSender(host="127.0.0.1", world_size=2, device="cpu", buffer_bytes=4096,
                             token=broadcast_actors.TOKEN, timeout_s=TIMEOUT)
    port = sender.address[1]
    listening = [c.laddr.ip for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    sender.close()
    assert listening == ["127.0.0.1"]  # not 0.0.0.0 / :: (every interface)


def test_a_forged_receiver_join_is_refused_then_the_real_one_works():
    """Someone without the token writes rank 1's proof into the sender's store: the sender refuses to form
    the group (RefitAuthError), and a new sender with a real receiver then refits bit for bit."""
    sender = BroadcastSender(host="127.0.0.1", world_size=2, device="cpu", buffer_bytes=4096,
                             token=broadcast_actors.TOKEN, timeout_s=TIMEOUT, connect_timeout_s=TIMEOUT)
    forger = dist.TCPStore("127.0.0.1", sender.address[1], 2, False, timeout=td(TIMEOUT), wait_for_workers=False)
    forger.set("auth/rank/1", b"\0" * 32)
    with pytest.raises(RefitAuthError, match=r"receiver ranks \[1\] did not prove the job token"):
        sender.connect()
    sender.close()

    sender = BroadcastSender(host="127.0.0.1", world_size=2, device="cpu", buffer_bytes=4096,
                             token=broadcast_actors.TOKEN, timeout_s=TIMEOUT, connect_timeout_s=120)
    conn, child = CTX.Pipe()
    proc = CTX.Process(target=broadcast_actors.receiver_process, daemon=True,
                       args=(child, sender.address, 1, 2, TIMEOUT))
    proc.start()
    sender.connect()
    assert Trio.recv(conn) == ("ready",)
    sent = odd_state(1)
    conn.send(("receive",))
    sender.stream(iter(sent), tensor_meta(sent))
    kind, got, _buckets, _loads = Trio.recv(conn)
    assert kind == "ok" and got == {n: to_bytes(t) for n, t in sent}
    conn.send(("close",))
    Trio.recv(conn)
    sender.close()
    proc.join(10)


def test_a_receiver_refuses_a_store_set_up_without_the_token():
    forged = BroadcastSender(host="127.0.0.1", world_size=2, device="cpu", buffer_bytes=4096,
                             token="not-the-job-token", timeout_s=TIMEOUT)
    conn, child = CTX.Pipe()
    proc = CTX.Process(target=broadcast_actors.receiver_process, daemon=True,
                       args=(child, forged.address, 1, 2, TIMEOUT))
    proc.start()
    kind, name, message, _ = Trio.recv(conn)
    assert (kind, name) == ("error", "RefitAuthError") and "not set up by this job's sender" in message
    proc.join(10)
    forged.close()


class Trio:
    """The sender in this process, two receivers in spawned processes, one gloo group."""

    def __init__(self) -> None:
        self.sender = BroadcastSender(host="127.0.0.1", world_size=3, device="cpu", buffer_bytes=16 << 10,
                                      token=broadcast_actors.TOKEN, timeout_s=TIMEOUT, connect_timeout_s=120)
        self.conns, self.procs = [], []
        for rank in (1, 2):
            conn, child = CTX.Pipe()
            proc = CTX.Process(target=broadcast_actors.receiver_process, daemon=True,
                               args=(child, self.sender.address, rank, 3, TIMEOUT))
            proc.start()
            self.conns.append(conn)
            self.procs.append(proc)
        self.sender.connect()
        assert [self.recv(c) for c in self.conns] == [("ready",), ("ready",)]

    @staticmethod
    def recv(conn, timeout: float = 60.0):
        assert conn.poll(timeout), "receiver process sent nothing"
        return conn.recv()

    def refit(self, sent, meta=None):
        """Both sides at once: returns (the sender's stats or exception, each receiver's reply)."""
        for c in self.conns:
            c.send(("receive",))
        try:
            out = self.sender.stream(iter(sent), meta if meta is not None else tensor_meta(sent))
        except Exception as e:
            out = e
        return out, [self.recv(c) for c in self.conns]

    def close(self) -> None:
        self.sender.close()
        for c in self.conns:
            c.send(("close",))
            assert self.recv(c) == ("closed",)
        for p in self.procs:
            p.join(30)
            assert p.exitcode == 0


@pytest.fixture(scope="class")
def trio():
    t = Trio()
    yield t
    t.close()


def assert_bit_identical(got: dict, sent) -> None:
    assert list(got) == [n for n, _ in sent]
    for name, t in sent:
        assert got[name] == to_bytes(t), name


class TestTransport:
    def test_bit_identical_overlapped_serial_and_relaid(self, trio):
        for i, (overlap, rows) in enumerate([(True, 64), (False, 64), (True, 64), (True, 80)]):
            trio.sender.overlap = overlap
            sent = odd_state(i, rows)
            stats, replies = trio.refit(sent)
            assert not isinstance(stats, Exception), stats
            assert stats.buckets > 3 and stats.manifest_sent == (i in (0, 3))  # once per layout
            for kind, got, buckets, loads in replies:
                assert kind == "ok" and buckets == loads == stats.buckets
                assert_bit_identical(got, sent)
        trio.sender.overlap = True

    def test_sender_failure_mid_stream_fails_everywhere_then_recovers(self, trio):
        sent = odd_state(5)
        bad = "layers.3.w"
        meta = tensor_meta(sent)
        broken = [(n, t.reshape(-1) if n == bad else t) for n, t in sent]
        err, replies = trio.refit(broken, meta)
        assert isinstance(err, RefitManifestError) and bad in str(err) and err.side == "sender"
        bucket = next(e.bucket for e in trio.sender.manifest(meta).entries if e.name == bad)
        for kind, name, msg, loads in replies:
            # the same named error, from the sender, with its traceback; buckets before the bad one loaded,
            # the ABORTed ones not
            assert (kind, name) == ("error", "RefitManifestError") and msg.startswith("sender failed:")
            assert bad in msg and "nccl/sender.py" in msg and loads == bucket
        stats, replies = trio.refit(sent)  # the group survived
        assert not isinstance(stats, Exception) and all(r[0] == "ok" for r in replies)
        assert_bit_identical(replies[0][1], sent)

    def test_digest_mismatch_fails_before_any_bucket(self, trio):
        a, b = odd_state(6), odd_state(7, rows=72)
        assert trio.refit(a)[1][0][0] == "ok"  # the receivers now hold a's manifest
        # A sender that wrongly believes they hold b's: the header announces b, no manifest follows.
        trio.sender._sent_digest = trio.sender.manifest(tensor_meta(b)).digest()
        err, replies = trio.refit(b)
        assert isinstance(err, RefitManifestError) and "receiver failed" in str(err)
        assert "announced manifest" in str(err)
        for kind, name, msg, loads in replies:
            assert (kind, name, loads) == ("error", "RefitManifestError", 0)
            assert "announced manifest" in msg
        stats, replies = trio.refit(b)  # the manifest is sent again and all is well
        assert stats.manifest_sent and all(r[0] == "ok" for r in replies)
        assert_bit_identical(replies[1][1], b)

    def test_receiver_rejecting_the_manifest_fails_every_side(self, trio):
        sent = odd_state(8)
        want = {n: (d, s) for n, d, s in tensor_meta(sent)}
        want["bf16"] = ("float32", want["bf16"][1])
        trio.conns[1].send(("expect", want))
        assert trio.recv(trio.conns[1]) == ("ok",)
        trio.sender._sent_digest = None
        err, replies = trio.refit(sent)
        assert isinstance(err, RefitManifestError) and "rank 2" in str(err) and "bf16" in str(err)
        assert [(r[0], r[1], r[3]) for r in replies] == [("error", "RefitManifestError", 0)] * 2
        trio.conns[1].send(("expect", None))
        assert trio.recv(trio.conns[1]) == ("ok",)
        assert all(r[0] == "ok" for r in trio.refit(sent)[1])


# ---- end to end: a policy actor and two vLLM engines in Ray actors ----------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return hf_reference.two_models(tmp_path_factory.mktemp("refit-bcast"))


@pytest.fixture(scope="module")
def hf(models):
    return hf_reference.greedy_of_each(models, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def engines(models):
    # A private instance, never a Ray cluster already running on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    actors = [EngineActor.remote(models[0]) for _ in range(2)]
    yield actors
    RENDEZVOUS.clear()
    ray.shutdown()


RENDEZVOUS = []  # the driver owns the jobs' rendezvous actors: they live as long as the test module


def form(engines, job: str, expected=None):
    """A new group: the sender publishes its address, every engine joins (both sides at once)."""
    RENDEZVOUS.append(get_rendezvous(job))
    sender = SenderActor.remote(job, len(engines) + 1, TIMEOUT, 64 << 10)
    world = len(engines) + 1
    ray.get([e.open.remote(job, rank, world, TIMEOUT, expected) for rank, e in enumerate(engines, 1)]
            + [sender.connect.remote()])
    return sender


def refit(sender, engines, checkpoint, **kw):
    return await_refit({"sender": [sender.stream.remote(checkpoint, **kw)],
                        "receiver": [e.receive.remote() for e in engines]}, timeout_s=4 * TIMEOUT)


def close(sender, engines) -> None:
    ray.get([e.close.remote() for e in engines] + [sender.close.remote()])
    ray.kill(sender)


@pytest.fixture(scope="module")
def group(engines, models):
    """The group of the first tests; test_ten_refits_in_a_row_then_close_and_reopen closes it."""
    return form(engines, "bcast-main", expected=expected_meta(models[0]))


def test_broadcast_into_two_engines_matches_hf(engines, group, models, hf):
    prompt_ids, want = hf
    assert ray.get([e.greedy.remote(prompt_ids, MAX_TOKENS) for e in engines]) == [want[0]] * 2

    out = refit(group, engines, models[1])
    buckets = out["sender"][0]["buckets"]
    assert buckets > 2 and [r["buckets"] for r in out["receiver"]] == [buckets] * 2
    sent = {n: fingerprint(t) for n, t in checkpoint_tensors(models[1])}
    readable = {n for n in sent if "norm" in n or "embed" in n}  # the parameters vLLM keeps unpacked on CPU
    for received, params in ray.get([e.fingerprints.remote() for e in engines]):
        assert received == sent  # what reached each engine, bit for bit
        assert readable and all(params[n] == sent[n] for n in readable)
    assert ray.get([e.greedy.remote(prompt_ids, MAX_TOKENS) for e in engines]) == [want[1]] * 2

    refit(group, engines, models[0])  # and back
    assert ray.get([e.greedy.remote(prompt_ids, MAX_TOKENS) for e in engines]) == [want[0]] * 2


def test_manifest_mismatch_fails_before_any_bucket(engines, group, models, hf):
    prompt_ids, want = hf
    ray.get([e.arm.remote() for e in engines])
    futures = {"sender": [group.stream.remote(models[1], cast="model.layers.0.mlp.up_proj.weight")],
               "receiver": [e.receive.remote() for e in engines]}
    with pytest.raises(RefitError, match="up_proj"):
        await_refit(futures, timeout_s=4 * TIMEOUT)
    for ref in futures["sender"] + futures["receiver"]:
        with pytest.raises(RefitManifestError, match="bfloat16"):
            ray.get(ref)
    assert ray.get([e.loads.remote() for e in engines]) == [0, 0]  # no bucket was ever loaded
    assert ray.get([e.greedy.remote(prompt_ids, MAX_TOKENS) for e in engines]) == [want[0]] * 2
    refit(group, engines, models[1])  # the group is intact
    assert ray.get([e.greedy.remote(prompt_ids, MAX_TOKENS) for e in engines]) == [want[1]] * 2


def test_ten_refits_in_a_row_then_close_and_reopen(engines, group, models, hf):
    prompt_ids, want = hf
    t = time.perf_counter()
    for i in range(10):
        out = refit(group, engines, models[i % 2])
        assert not out["sender"][0]["manifest_sent"]  # the manifest went once, at the group's first refit
    per_refit = (time.perf_counter() - t) / 10
    assert per_refit < TIMEOUT
    assert ray.get([e.greedy.remote(prompt_ids, MAX_TOKENS) for e in engines]) == [want[1]] * 2

    close(group, engines)  # a clean shutdown: then a brand-new group on the same engines
    sender = form(engines, "bcast-reopened")
    out = refit(sender, engines, models[0])
    assert out["sender"][0]["manifest_sent"]
    assert ray.get([e.greedy.remote(prompt_ids, MAX_TOKENS) for e in engines]) == [want[0]] * 2
    close(sender, engines)
    ray.get([e.close.remote() for e in engines])  # closing twice is harmless


@pytest.mark.parametrize("bad", [{"drop": "model.layers.1.self_attn.k_proj.weight"},
                                 {"reshape": "model.layers.0.mlp.down_proj.weight"}], ids=["withheld", "misshaped"])
def test_the_engine_refuses_an_inexact_manifest_before_any_bucket(engines, models, hf, bad):
    """No `expected` list here: the engines' own check of what their loader accepts refuses the refit."""
    prompt_ids, want = hf
    sender = form(engines, f"bcast-inexact-{next(iter(bad))}")
    ray.get([e.arm.remote() for e in engines])
    futures = {"sender": [sender.stream.remote(models[1], **bad)], "receiver": [e.receive.remote() for e in engines]}
    with pytest.raises(RefitError, match="cannot take this refit exactly"):  # one error for the refit
        await_refit(futures, timeout_s=4 * TIMEOUT)
    name = next(iter(bad.values()))
    for ref in futures["receiver"]:  # each engine names what is wrong
        with pytest.raises(RefitManifestError, match=name.rsplit(".", 2)[0].replace(".", r"\.")):
            ray.get(ref)
    with pytest.raises(RefitManifestError):
        ray.get(futures["sender"][0])
    assert ray.get([e.loads.remote() for e in engines]) == [0, 0]  # no bucket was ever loaded
    refit(sender, engines, models[0])  # the group is intact, the engines exact
    assert ray.get([e.greedy.remote(prompt_ids, MAX_TOKENS) for e in engines]) == [want[0]] * 2
    close(sender, engines)


def test_killed_receiver_makes_the_others_raise_in_time(engines, models):
    sender = form(engines, "bcast-kill-receiver")
    ray.get(engines[1].arm.remote(2))  # SIGKILL inside the load of bucket 2
    futures = {"sender": [sender.stream.remote(models[1])], "receiver": [e.receive.remote() for e in engines]}
    t = time.perf_counter()
    # The driver names the death as soon as Ray knows of it (plus its 3 s grace for the others' outcome),
    # not after the survivors' transport timeout (the bound: a busy 2-core CI machine streams slowly too).
    with pytest.raises(RefitPeerDiedError, match="refit failed on the receiver side") as info:
        await_refit(futures, timeout_s=6 * TIMEOUT)
    assert time.perf_counter() - t < TIMEOUT and info.value.side == "receiver"
    with pytest.raises(RefitTimeoutError, match="sender: gave up waiting for receivers to take"):
        ray.get(futures["sender"][0])
    with pytest.raises(RefitTimeoutError, match="receiver rank 1: gave up waiting for"):
        ray.get(futures["receiver"][0])
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(futures["receiver"][1])
    ray.get([engines[0].close.remote(), sender.close.remote()])  # a broken group closes without hanging
    ray.kill(sender)
    engines.pop()


def test_killed_sender_makes_the_receiver_raise_in_time(engines, models, hf):
    prompt_ids, want = hf
    [engine] = engines
    sender = form(engines, "bcast-kill-sender")
    futures = {"sender": [sender.stream.remote(models[1], die_at_tensor=10)],
               "receiver": [engine.receive.remote()]}
    t = time.perf_counter()
    with pytest.raises(RefitPeerDiedError, match="refit failed on the sender side"):
        await_refit(futures, timeout_s=6 * TIMEOUT)
    assert time.perf_counter() - t < TIMEOUT  # the death named before the receiver's transport timeout
    with pytest.raises(RefitTimeoutError, match="receiver rank 1: gave up waiting for bucket"):
        ray.get(futures["receiver"][0])
    assert time.perf_counter() - t < 3 * TIMEOUT
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(futures["sender"][0])
    ray.get(engine.close.remote())

    sender = form(engines, "bcast-after-kills")  # the surviving engine serves a new sender
    refit(sender, engines, models[1])
    assert ray.get(engine.greedy.remote(prompt_ids, MAX_TOKENS)) == want[1]
    close(sender, engines)


# ---- GPU: NCCL between two devices ------------------------------------------------------------------------

@pytest.mark.gpu
def test_nccl_broadcast_cuda0_to_cuda1_is_bit_identical():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    sender = BroadcastSender(host="127.0.0.1", world_size=2, device="cuda:0", buffer_bytes=1 << 20,
                             token=broadcast_actors.TOKEN, timeout_s=60)
    conn, child = CTX.Pipe()
    proc = CTX.Process(target=broadcast_actors.receiver_process, daemon=True,
                       args=(child, sender.address, 1, 2, 60.0, "cuda:1"))
    proc.start()
    try:
        sender.connect()
        assert conn.recv() == ("ready",)
        g = torch.Generator(device="cuda:0").manual_seed(0)
        for overlap in (True, False, True):
            sender.overlap = overlap
            sent = [(f"w{i}", torch.randn(n, 257, device="cuda:0", generator=g).to(torch.bfloat16))
                    for i, n in enumerate([3, 1000, 17, 4096, 5])]
            sent += [("big", torch.randn(8192, 1024, device="cuda:0", generator=g)),  # 32 MiB: oversized
                     ("strided", torch.randn(64, 48, device="cuda:0", generator=g).t())]
            conn.send(("receive",))
            stats = sender.stream(iter(sent), tensor_meta(sent))
            kind, got, buckets, _loads = conn.recv()
            assert kind == "ok" and buckets == stats.buckets > 2
            assert_bit_identical(got, sent)
        conn.send(("close",))
        assert conn.recv() == ("closed",)
    finally:
        sender.close()
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
