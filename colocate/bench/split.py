"""Split-placement refit benchmark: a model's tensors broadcast from the policy's device to N vLLM engines,
each on a device of its own, by every method side by side, from one run.

    python -m colocate.bench.split --device cuda --model llama3-8b --receivers 1 --repeats 10 --json out.json
    python -m colocate.bench.split --device cpu --model tiny --receivers 2 --repeats 5 --json out.json

Processes (multiprocessing spawn, no Ray): the sender on device 0 (cuda:0 or the CPU), receiver i (1..N) a
process with a vLLM engine on device i: each process is started with CUDA_VISIBLE_DEVICES naming its one
GPU, so every NCCL rank has a GPU of its own (NCCL refuses two ranks on one GPU): N + 1 GPUs are needed.
The parent only sends commands; for each method every process runs its side of warm-up + `--repeats` + one
recorded refit in lockstep (each refit ends with an all-reduce, so the next starts together); the sender
times each refit, from its first byte to the last receiver's `finish_weight_update`.

Methods (median of the timed repeats):
  colocate          colocate.refit.nccl: bucketed, double-buffered (pack N+1 / load N overlap the wire)
  colocate_serial   the same with overlap off: one bucket at a time, packed, sent, loaded
  floor             the same buckets broadcast from ready buffers: no packing, no loading, two in flight
  vllm_native       vLLM's NCCL weight-transfer engine (packed, two buffers; GPU and vLLM 0.24 only):
                    trainer_init/init_weight_transfer_engine once, then per refit start_weight_update,
                    update_weights || trainer_send_weights, finish_weight_update

`correct`: after the recorded refit every engine was handed exactly the bytes sent (CPU: sha256; GPU:
on-device word sums), and its parameters hold them where vLLM keeps them readable (bench/refit.py's
`engine_params_match`); vllm_native: the parameters only. Floor: not applicable (null).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

import torch

from colocate.bench.model_shapes import param_meta, resolve_model
from colocate.bench.refit import (
    _make_tensors,
    _sync,
    engine_params_match,
    report_fatal,
    write_outputs,
)
from colocate.bench.refit import _report as refit_report
from colocate.refit.ipc.jobdir import new_token

METHODS = ("colocate", "colocate_serial", "floor", "vllm_native")
EXT = "colocate.refit.engine_side.RefitExtension"
JOB = "bench-split"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m colocate.bench.split", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="tiny", help="tiny | llama3-8b | qwen2.5-1.5b | a HF directory")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--receivers", type=int, default=1, help="engines, one device each (GPU: needs N+1 GPUs)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--buffer-mb", type=float, default=1024, help="size of each of the two bucket buffers")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--plot", default=None, help="PNG path (default: beside --json)")
    p.add_argument("--replot", default=None, metavar="JSON", help="only draw the PNG of an earlier run")
    return p.parse_args(argv)


# ---- collectives shared by both sides ---------------------------------------------------------------------

def floor_broadcast(group: Any, buckets: list[int], buffers: list[torch.Tensor]) -> None:
    """Broadcast frames of the given sizes from two ready buffers, two in flight; then align all ranks."""
    from colocate.refit.nccl.frames import frame_bytes

    in_flight: deque = deque()
    for i, nbytes in enumerate(buckets):
        if len(in_flight) >= 2:
            group.wait(in_flight.popleft(), "a floor bucket")
        in_flight.append(group.broadcast(buffers[i % 2][:frame_bytes(nbytes)], "a floor bucket"))
    while in_flight:
        group.wait(in_flight.popleft(), "a floor bucket")
    group.statuses(0, "the end of a floor refit")


def _floor_buffers(buckets: list[int], device: str) -> list[torch.Tensor]:
    from colocate.refit.nccl.frames import frame_bytes

    return [torch.empty(frame_bytes(max(buckets)), dtype=torch.uint8, device=device) for _ in range(2)]


def _worker_floor(worker: Any, buckets: list[int], count: int) -> None:
    """Runs in the engine's worker (`collective_rpc` with a callable): the receivers' side of `floor`."""
    group = worker._colocate_join().group
    buffers = _floor_buffers(buckets, str(group.device))
    for _ in range(count):
        floor_broadcast(group, buckets, buffers)


def _worker_barrier(worker: Any) -> None:
    worker._colocate_join().group.statuses(0, "the end of a vllm_native refit")


@contextlib.contextmanager
def _env(**values: str | None):
    """Set environment variables for a child started inside (spawn copies the environment at start)."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is not None:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- the sender process -----------------------------------------------------------------------------------

def sender_main(conn, a: dict[str, Any]) -> None:
    report_fatal(conn, _sender, a)


def _sender(conn, a: dict[str, Any]) -> None:
    from colocate.refit.checksum import fingerprint
    from colocate.refit.nccl.sender import BroadcastSender
    from colocate.refit.plan import tensor_meta

    device = "cuda:0" if a["device"] == "cuda" else "cpu"
    tensors = _make_tensors(a["meta"], getattr(torch, a["dtype"]), device, seed=1)
    meta_full = tensor_meta(tensors)
    sender = BroadcastSender(host="127.0.0.1", world_size=a["receivers"] + 1, device=device,
                             buffer_bytes=a["buffer_bytes"], token=a["token"], timeout_s=a["timeout"])
    buckets = [b.nbytes for b in sender.manifest(meta_full).buckets]
    conn.send(("ready", sender.address, sum(t.numel() * t.element_size() for _, t in tensors), len(tensors),
               {n: fingerprint(t) for n, t in tensors}, buckets))
    native = None
    while True:
        cmd = conn.recv()
        try:
            if cmd[0] == "connect":
                sender.connect()
                conn.send(("ok", None))
            elif cmd[0] == "native_init":
                from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

                native = NCCLWeightTransferEngine.trainer_init(dict(
                    master_address="127.0.0.1", master_port=cmd[1], world_size=a["receivers"] + 1))
                conn.send(("ok", None))
            elif cmd[0] == "run":
                method, count = cmd[1], cmd[2]
                out: dict[str, Any] = {"times_s": []}
                floor_bufs = _floor_buffers(buckets, device) if method == "floor" else None
                for _ in range(count):
                    _sync(device)
                    t = time.perf_counter()
                    if method in ("colocate", "colocate_serial"):
                        sender.overlap = method == "colocate"
                        st = sender.stream(iter(tensors), meta_full)
                        out.setdefault("pack_s", []).append(st.pack_seconds)
                        out.setdefault("wait_s", []).append(st.wait_seconds)
                        out["buckets"] = st.buckets
                    elif method == "floor":
                        floor_broadcast(sender.group, buckets, floor_bufs)
                    else:
                        _native_send(native, tensors, a["buffer_bytes"])
                        sender.group.statuses(0, "the end of a vllm_native refit")
                    _sync(device)
                    out["times_s"].append(time.perf_counter() - t)
                conn.send(("ok", out))
            elif cmd[0] == "close":
                sender.close()
                conn.send(("ok", None))
                return
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _native_send(native: Any, tensors: list[tuple[str, torch.Tensor]], buffer_bytes: int) -> None:
    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLTrainerSendWeightsArgs,
        NCCLWeightTransferEngine,
    )

    args = NCCLTrainerSendWeightsArgs(group=native, packed=True, packed_buffer_size_bytes=buffer_bytes,
                                      packed_num_buffers=2)
    NCCLWeightTransferEngine.trainer_send_weights(iter(tensors), args)


# ---- a receiver process -----------------------------------------------------------------------------------

def receiver_main(conn, a: dict[str, Any], rank: int) -> None:
    report_fatal(conn, _receiver, a, rank)


def _receiver(conn, a: dict[str, Any], rank: int) -> None:
    from colocate.engine.vllm_engine import make_llm, shutdown_llm

    on_gpu = a["device"] == "cuda"
    native = on_gpu and "vllm_native" in a["methods"]
    extra = {"weight_transfer_config": {"backend": "nccl"}} if native else {}
    llm = make_llm(a["model_dir"], dtype=a["dtype"], load_format="auto" if a["has_weights"] else "dummy",
                   seed=0, max_model_len=256, kv_cache_memory_bytes=(1 << 30) if on_gpu else None,
                   worker_extension_cls=EXT, skip_tokenizer_init=True, extra_engine_kwargs=extra)
    conn.send(("ready",))
    world = a["receivers"] + 1
    meta_full = [(n, a["dtype"], tuple(s)) for n, s in a["meta"]]
    while True:
        cmd = conn.recv()
        try:
            if cmd[0] == "connect":
                llm.collective_rpc("colocate_refit_open", args=("broadcast",), kwargs=dict(
                    job=JOB, token=a["token"], rank=rank, world_size=world, timeout_s=a["timeout"],
                    master=tuple(cmd[1]),
                    connect=True))
                conn.send(("ok", None))
            elif cmd[0] == "native_init":
                llm.init_weight_transfer_engine({"init_info": dict(
                    master_address="127.0.0.1", master_port=cmd[1], rank_offset=rank, world_size=world)})
                conn.send(("ok", None))
            elif cmd[0] == "run":
                method, count, buckets = cmd[1], cmd[2], cmd[3]
                out: dict[str, Any] = {}
                if method in ("colocate", "colocate_serial"):
                    loads, waits = [], []
                    for i in range(count):
                        llm.collective_rpc("colocate_refit_set_record", args=(i == count - 1,))
                        [st] = llm.collective_rpc("colocate_refit_receive")
                        loads.append(st["load_seconds"])
                        waits.append(st["wait_seconds"])
                    out.update(load_s=loads, wait_s=waits)
                elif method == "floor":
                    llm.collective_rpc(_worker_floor, args=(buckets, count))
                else:
                    update = dict(names=[n for n, _, _ in meta_full],
                                  dtype_names=[d for _, d, _ in meta_full],
                                  shapes=[list(s) for _, _, s in meta_full], packed=True,
                                  packed_buffer_size_bytes=a["buffer_bytes"], packed_num_buffers=2)
                    for _ in range(count):
                        llm.start_weight_update(is_checkpoint_format=True)
                        llm.update_weights({"update_info": update})
                        llm.finish_weight_update()
                        llm.collective_rpc(_worker_barrier)
                if method != "floor":
                    [received] = llm.collective_rpc("colocate_received_fingerprints")
                    [params] = llm.collective_rpc("colocate_param_fingerprints")
                    out.update(received=received, params=params)
                conn.send(("ok", out))
            elif cmd[0] == "close":
                llm.collective_rpc("colocate_refit_close")
                shutdown_llm(llm)
                conn.send(("ok", None))
                return
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


# ---- the parent -------------------------------------------------------------------------------------------

class Fleet:
    """The sender and receiver processes, and lockstep commands to all of them."""

    def __init__(self, a: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(a["receivers"] + 1)]
        self.conns, self.procs = [], []
        for rank in range(a["receivers"] + 1):
            conn, child = ctx.Pipe()
            target, args = (sender_main, (child, a)) if rank == 0 else (receiver_main, (child, a, rank))
            # GPU: each process sees only its own GPU. CPU: one thread each, or the engines' OpenMP pools
            # fight over the cores and the timings measure that.
            on_gpu = a["device"] == "cuda"
            with _env(CUDA_VISIBLE_DEVICES=ids[rank] if on_gpu else None,
                      OMP_NUM_THREADS=None if on_gpu else "1"):
                proc = ctx.Process(target=target, args=args, daemon=True)
                proc.start()
            self.conns.append(conn)
            self.procs.append(proc)
        self.timeout = a["timeout"]

    def _recv(self, rank: int, timeout: float) -> tuple:
        conn, proc = self.conns[rank], self.procs[rank]
        deadline = time.monotonic() + timeout
        while not conn.poll(1.0):
            if not proc.is_alive():
                raise RuntimeError(f"process {rank} died (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {rank} sent nothing within {timeout:.0f}s")
        msg = conn.recv()
        if msg[0] == "fatal":
            raise RuntimeError(f"process {rank} failed:\n{msg[1]}")
        return msg

    def ready(self) -> tuple:
        """Wait for the sender's tensors and every engine; returns the sender's ready message."""
        first = self._recv(0, 30 * self.timeout)
        for rank in range(1, len(self.conns)):
            self._recv(rank, 30 * self.timeout)
        return first

    def all(self, cmds: list[tuple], timeout: float) -> list[Any]:
        """Send each process its command at once, then collect every reply; raise on any error."""
        for conn, cmd in zip(self.conns, cmds, strict=True):
            conn.send(cmd)
        replies = [self._recv(rank, timeout) for rank in range(len(self.conns))]
        errors = [f"process {r}: {m[1]}" for r, m in enumerate(replies) if m[0] == "error"]
        if errors:
            raise RuntimeError("\n".join(errors))
        return [m[1] for m in replies]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.all([("close",)] * len(self.conns), self.timeout)
        for p in self.procs:
            p.join(30)
            if p.is_alive():
                p.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.device == "cuda" and torch.cuda.device_count() < args.receivers + 1:
        raise SystemExit(f"--receivers {args.receivers} needs {args.receivers + 1} GPUs (one per NCCL rank), "
                         f"{torch.cuda.device_count()} visible")
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    model_dir, has_weights = resolve_model(args.model)
    a = dict(token=new_token(), device=args.device, model_dir=str(model_dir), has_weights=has_weights, dtype=dtype,
             meta=param_meta(model_dir, getattr(torch, dtype)), receivers=args.receivers, methods=methods,
             buffer_bytes=int(args.buffer_mb * (1 << 20)), timeout=args.timeout)
    t = time.perf_counter()
    fleet = Fleet(a)
    n = args.receivers + 1
    rows: list[dict[str, Any]] = []
    try:
        _, address, total_bytes, n_tensors, sent_fps, buckets = fleet.ready()
        print(f"{args.model}: {n_tensors} tensors, {total_bytes / 1e9:.2f} GB {dtype}, {len(buckets)} "
              f"buckets; {args.receivers} engines up in {time.perf_counter() - t:.1f}s", file=sys.stderr,
              flush=True)
        fleet.all([("connect",)] + [("connect", address)] * args.receivers, args.timeout * 3)
        count = args.repeats + 2  # warm-up, timed repeats, one recorded for `correct`
        for method in methods:
            row: dict[str, Any] = {"method": method, "buffer_bytes": a["buffer_bytes"]}
            if method == "vllm_native" and args.device != "cuda":
                row["skipped"] = "vLLM's NCCL weight transfer needs CUDA"
                rows.append(row)
                continue
            try:
                if method == "vllm_native":
                    port = _free_port()
                    fleet.all([("native_init", port)] * n, args.timeout * 3)
                sender, *receivers = fleet.all([("run", method, count)] + [("run", method, count, buckets)]
                                               * args.receivers, args.timeout * (count + 2))
                row.update(_row(method, sender, receivers, sent_fps))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            status = row.get("error") or f"median {statistics.median(row['times_s']) * 1e3:.2f} ms"
            print(f"  {method:<22} {status}", file=sys.stderr, flush=True)
    finally:
        fleet.close()
    return _report(args, dtype, total_bytes, n_tensors, a["buffer_bytes"], rows)


def _row(method: str, sender: dict, receivers: list[dict], sent_fps: dict[str, str]) -> dict[str, Any]:
    times = sender["times_s"]
    row: dict[str, Any] = {"cold_s": times[0], "times_s": times[1:-1]}
    if "pack_s" in sender:
        row["sender_pack_s"] = statistics.median(sender["pack_s"][1:-1])
        row["sender_wait_s"] = statistics.median(sender["wait_s"][1:-1])
        row["buckets"] = sender["buckets"]
    if "load_s" in receivers[0]:
        row["receiver_load_s"] = statistics.median(statistics.median(r["load_s"][1:-1]) for r in receivers)
        row["receiver_wait_s"] = statistics.median(statistics.median(r["wait_s"][1:-1]) for r in receivers)
    if method == "floor":
        row["correct"] = None
        return row
    matches = [engine_params_match(r["params"], sent_fps) for r in receivers]
    params_ok = all(ok for ok, _ in matches)
    row["params_compared"] = min(n for _, n in matches)
    if method == "vllm_native":
        row["correct"] = params_ok
    else:
        row["received_equal"] = all(r["received"] == sent_fps for r in receivers)
        row["correct"] = row["received_equal"] and params_ok
    return row


def _report(args, dtype, total_bytes, n_tensors, buffer_bytes, rows) -> dict[str, Any]:
    report = refit_report(args, dtype, total_bytes, n_tensors, buffer_bytes, rows, prog="colocate.bench.split")
    if args.device == "cuda":
        report["device"] = f"{args.receivers + 1} x {report['device']}"
    report["receivers"] = args.receivers
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    report = json.loads(Path(args.replot).read_text()) if args.replot else run(args)
    write_outputs(args, report)
    return report


if __name__ == "__main__":
    main()
