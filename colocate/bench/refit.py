"""Refit benchmark: a model's tensors from a trainer process into a vLLM engine in another process on the
same device, by every method side by side, from one run.

    python -m colocate.bench.refit --device cuda --model llama3-8b --repeats 10 --json out.json
    python -m colocate.bench.refit --device cpu --model tiny --repeats 5 --json out.json
    python -m colocate.bench.refit --device cuda --model /tmp/qwen-random --policy fsdp2 --json out.json

Methods (each: warm-up refit first, then `--repeats` timed ones, median reported):
  colocate             the default path: one copy where it applies (GPU: the engine copies straight from the
                       trainer's tensors through cached CUDA IPC handles), else `colocate_buffered`
  colocate_buffered    ping-pong buffers, packing bucket N+1 while the engine loads bucket N
  colocate_load_weights  buffered, but each bucket goes through vLLM's `model.load_weights` (on GPU the
                       engine otherwise copies straight into its parameters: colocate/engine/direct_load.py)
  colocate_serial      the same protocol with overlap off (wait for each ack before packing the next)
  per_tensor           one handle per tensor (GPU: the tensor itself shared by CUDA IPC; CPU: a segment each)
  vllm_native          vLLM's own IPC weight-transfer engine, packed buffers (GPU only)
  vllm_native_unpacked the same, one IPC handle per tensor (GPU only)
  floor                one process, one device copy per tensor: what any refit must at least spend
  floor_pack_unpack    one process, pack into buffers then unpack: the two copies a bucketed refit makes

In-training mode (`--policy fsdp2`; `--model` a directory with weights, or tiny): a real one-rank FSDP2 policy
(fp32 master weights, bf16 compute) is the trainer, and its weights change in place before every refit:
  policy               the default path (GPU: one copy, the engine casting from the fp32 parameters)
  policy_buffered      fills: each shard cast straight into the ping-pong buffers, then the engine's copy
  policy_gather_clone  the path before: FSDP unshard, a clone per tensor, pack, the engine's copy
  floor_cast_copy      one process, one cast + copy per tensor from the fp32 parameters: the floor
`--policy megatron` (CUDA): one Megatron-core rank (tp = pp = 1, bf16 parameters) instead; `policy` is one copy
from its parameters (q, k, v as strided views of the interleaved qkv: refit/folded.py), `policy_buffered`
converts to HF tensors and packs them (the path of tp > 1 or pp > 1), the floor copies each parameter once.
Rows report the sender's gather, pack and wait and the engine's load beside the time.
`correct` (refit methods): after one more, recorded refit, the tensors the engine was handed equal what was
sent (CPU: sha256 of the bytes; GPU: on-device word sums), and so do the engine's parameters wherever vLLM
keeps them readable (GPU: all, fused q/k/v and gate/up checked against the sum of their parts; CPU: those
not repacked). Floors: the destination equals the source.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from colocate.bench.model_shapes import param_meta, resolve_model
from colocate.refit.ipc.jobdir import new_job_dir, new_token

REFIT_METHODS = ("colocate", "colocate_buffered", "colocate_load_weights", "colocate_serial", "per_tensor")
POLICY_METHODS = ("policy", "policy_buffered", "policy_gather_clone")
NATIVE_METHODS = ("vllm_native", "vllm_native_unpacked")
FLOOR_METHODS = ("floor", "floor_pack_unpack")
ALL_METHODS = REFIT_METHODS + NATIVE_METHODS + FLOOR_METHODS
TRAINING_METHODS = (*POLICY_METHODS, "floor_cast_copy")
EXT = "colocate.refit.engine_side.RefitExtension"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m colocate.bench.refit", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="tiny", help="tiny | llama3-8b | qwen2.5-1.5b | a HF directory")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--buffer-mb", type=float, default=1024, help="size of each of the two ping-pong buffers")
    p.add_argument("--methods", default=None, help="default: every method of the mode")
    p.add_argument("--policy", choices=["none", "fsdp2", "megatron"], default="none",
                   help="the in-training mode: a real one-rank FSDP2 (or Megatron-core, CUDA) policy is the trainer")
    p.add_argument("--sweep-mb", default="", help="also time `colocate` at these buffer sizes, e.g. 256,2048")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--plot", default=None, help="PNG path (default: beside --json)")
    p.add_argument("--replot", default=None, metavar="JSON", help="only draw the PNG of an earlier run")
    return p.parse_args(argv)


# ---- verification ---------------------------------------------------------------------------------------

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def engine_params_match(params: dict[str, str], sent: dict[str, str]) -> tuple[bool, int]:
    """Compare the engine's parameter fingerprints with what was sent; returns (all equal, how many compared).

    A fused vLLM parameter (qkv_proj, gate_up_proj) is the concatenation of its HF parts: with word-sum
    fingerprints its sum is the sum of theirs (zero padding adds nothing). Exact hashes are compared 1:1."""
    compared, ok = 0, True
    for vname, fp in params.items():
        parts = [vname]
        for fused, subs in FUSED.items():
            if f".{fused}." in vname:
                parts = [vname.replace(fused, s) for s in subs]
        if not all(p in sent for p in parts):
            continue
        fps = [sent[p] for p in parts]
        if len(fps) == 1:
            want = fps[0]
        elif all(f.startswith("sum:") for f in fps):
            want = f"sum:{sum(int(f[4:]) for f in fps)}"
        else:
            continue
        compared += 1
        ok = ok and fp == want
    return ok and compared > 0, compared


# ---- the trainer process --------------------------------------------------------------------------------


def _make_tensors(meta, dtype: torch.dtype, device: str, seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [(n, torch.randn(shape, dtype=dtype, device=device, generator=g)) for n, shape in meta]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, repeats: int, device: str) -> tuple[float, list[float]]:
    """(cold time, timed repeats) of fn, synchronised."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    cold = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return cold, times


def _floor(method: str, tensors, meta_full, buffer_bytes: int, repeats: int, device: str) -> dict[str, Any]:
    from colocate.refit.plan import dtype_from_name, plan

    dst = [torch.empty_like(t) for _, t in tensors]
    if method == "floor":
        def run() -> None:
            for d, (_, t) in zip(dst, tensors, strict=True):
                d.copy_(t)
    else:
        manifest = plan(meta_full, buffer_bytes)
        buf = torch.empty(buffer_bytes, dtype=torch.uint8, device=device)

        def run() -> None:
            for b in manifest.buckets:
                span = range(b.first, b.last)
                big = torch.empty(b.nbytes, dtype=torch.uint8, device=device) if b.oversized else buf
                views = []
                for i in span:
                    e = manifest.entries[i]
                    views.append(big[e.offset:e.offset + e.nbytes].view(dtype_from_name(e.dtype)).view(e.shape))
                for i, v in zip(span, views, strict=True):
                    v.copy_(tensors[i][1])
                for i, v in zip(span, views, strict=True):
                    dst[i].copy_(v)
    cold, times = _time(run, repeats, device)
    correct = all(torch.equal(d, t) for d, (_, t) in zip(dst, tensors, strict=True))
    return {"cold_s": cold, "times_s": times, "correct": correct}


def report_fatal(conn, body, *args: Any) -> None:
    """Run a benchmark child's `body(conn, *args)`; whatever it raises reaches the parent as ("fatal",
    traceback) instead of a silent exit the parent would wait on."""
    try:
        body(conn, *args)
    except BaseException as e:
        conn.send(("fatal", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def trainer_main(conn, args: dict[str, Any]) -> None:
    """Runs in its own process: holds the tensors, drives every method, reports timings."""
    report_fatal(conn, _trainer, args)


def _trainer(conn, a: dict[str, Any]) -> None:
    from colocate.refit.checksum import fingerprint
    from colocate.refit.ipc.sender import RefitSender
    from colocate.refit.plan import tensor_meta

    device, repeats = a["device"], a["repeats"]
    if device == "cuda":
        torch.cuda.set_device(0)
    tensors = _make_tensors(a["meta"], getattr(torch, a["dtype"]), device, seed=1)
    meta_full = tensor_meta(tensors)
    sent_fps = {n: fingerprint(t) for n, t in tensors}
    conn.send(("ready", sum(t.numel() * t.element_size() for _, t in tensors), len(tensors)))

    def call_engine(name: str, kwargs: dict) -> Any:
        conn.send(("call", name, kwargs))
        kind, value = conn.recv()
        if kind == "error":
            raise RuntimeError(f"engine call {name} failed:\n{value}")
        return value

    runs = [(m, a["buffer_bytes"]) for m in a["methods"]]
    runs += [("colocate", int(mb * (1 << 20))) for mb in a["sweep_mb"]]
    for method, buffer_bytes in runs:
        row: dict[str, Any] = {"method": method, "buffer_bytes": buffer_bytes}
        if buffer_bytes != a["buffer_bytes"]:
            row["method"] = f"{method}@{buffer_bytes / (1 << 20):g}MiB"
        try:
            if method in FLOOR_METHODS:
                row.update(_floor(method, tensors, meta_full, buffer_bytes, repeats, device))
            elif method in REFIT_METHODS:
                sender = RefitSender(address=a["address"], token=a["token"], job_dir=a["job_dir"], device=device,
                                     buffer_bytes=buffer_bytes, timeout_s=a["timeout"],
                                     overlap=method != "colocate_serial", per_tensor=method == "per_tensor")
                resident = tensors if method == "colocate" else None
                # warm-up, timed repeats, then one the engine records for `correct`
                mode = "load_weights" if method == "colocate_load_weights" else "direct"
                conn.send(("serve", repeats + 2, mode))
                stats = []

                def one(s=sender, out=stats, r=resident) -> None:
                    out.append(s.stream(iter(tensors), meta_full, resident=r))

                cold, times = _time(one, repeats, device)
                sender.stream(iter(tensors), meta_full, resident=resident)
                received, params = call_engine("colocate_fingerprints", {})
                sender.close()
                call_engine("colocate_drop_buffers", {})
                timed = stats[1:]
                row.update(_sender_stats(timed))
                params_ok, compared = engine_params_match(params, sent_fps)
                row.update(cold_s=cold, times_s=times, correct=received == sent_fps and params_ok,
                           received_equal=received == sent_fps, params_compared=compared)
            elif method in NATIVE_METHODS:
                if device != "cuda":
                    row["skipped"] = "vLLM's IPC weight transfer is CUDA only"
                else:
                    from colocate.bench.vllm_native import native_refit

                    packed = method == "vllm_native"
                    # vLLM's packed buffer must hold the largest tensor (Llama-3-8B's embedding: 1.05 GB)
                    bucket = max(1 << 30, max(t.numel() * t.element_size() for _, t in tensors))
                    cold, times = _time(lambda p=packed, b=bucket: native_refit(
                        tensors, packed=p, call_engine=call_engine, bucket_bytes=b), repeats, device)
                    _received, params = call_engine("colocate_fingerprints", {})
                    params_ok, compared = engine_params_match(params, sent_fps)
                    row.update(cold_s=cold, times_s=times, correct=params_ok, params_compared=compared)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()
        conn.send(("row", row))
    conn.send(("done",))


def _sender_stats(stats) -> dict[str, Any]:
    return {"sender_gather_s": statistics.median(x.gather_seconds for x in stats),
            "sender_pack_s": statistics.median(x.pack_seconds for x in stats),
            "sender_wait_s": statistics.median(x.wait_seconds for x in stats),
            "buckets": stats[0].buckets, "one_copy": stats[0].one_copy}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp2_trainer(model_dir: str, device: str, dtype: torch.dtype, rank: int = 0, world_size: int = 1,
                  master_port: int | None = None):
    """The in-training modes' trainer: rank `rank` of a real FSDP2 policy (fp32 master weights, bf16
    compute), the meta of what it streams, and `perturb()`: what an optimizer step does to the weights
    (all of them change, in place; each call differently)."""
    from colocate.policy.worker import PolicyWorker
    from colocate.refit.plan import manifest_meta_of

    worker = PolicyWorker(model_path=model_dir, rank=rank, world_size=world_size, master_addr="127.0.0.1",
                          master_port=master_port or _free_port(), device=device, param_dtype="bfloat16")
    perturb = _perturber([p.to_local() for p in worker.model.parameters()], str(worker.device))
    return worker, manifest_meta_of(worker.weights_manifest(dtype)), perturb


def megatron_trainer(model_dir: str, dtype: torch.dtype):
    """`--policy megatron`'s trainer: one Megatron-core rank (tp = pp = 1, bf16 parameters in its DDP buffer,
    fp32 master weights in the distributed optimizer), as `fsdp2_trainer` returns it."""
    from colocate.policy.megatron.worker import MegatronPolicyWorker
    from colocate.refit.plan import manifest_meta_of

    worker = MegatronPolicyWorker(model_path=model_dir, rank=0, world_size=1, master_addr="127.0.0.1",
                                  master_port=_free_port(), param_dtype="bfloat16")
    perturb = _perturber(list(worker.model.module.parameters()), "cuda")
    return worker, manifest_meta_of(worker.weights_manifest(dtype)), perturb


def _perturber(tensors: list[torch.Tensor], device: str):
    """`perturb()`: what an optimizer step does to `tensors` (a rank's local parameters): every one changes, in
    place, differently at each call. `perturb.tensors`: them, detached (the floor copies from them)."""
    tensors = [t.detach() for t in tensors]
    step = [0]

    def perturb() -> None:
        step[0] += 1
        with torch.no_grad():
            for t in tensors:
                t.mul_(1.0 + 2.0 ** -(4 + step[0] % 3))
        _sync(device)

    perturb.tensors = tensors
    return perturb


def _policy_trainer(conn, a: dict[str, Any]) -> None:
    """The in-training mode's trainer: a one-rank FSDP2 or Megatron policy; see the module docstring."""
    from colocate.refit.checksum import fingerprint
    from colocate.refit.ipc.sender import RefitSender

    device, repeats = a["device"], a["repeats"]
    dtype = getattr(torch, a["dtype"])
    if a["policy"] == "megatron":
        worker, meta, perturb = megatron_trainer(a["model_dir"], dtype)
    else:
        worker, meta, perturb = fsdp2_trainer(a["model_dir"], device, dtype)
    params = perturb.tensors

    def weights_fps() -> dict[str, str]:
        return {n: fingerprint(t) for n, t in worker.iter_weights(dtype)}

    total = sum(x.numel() * x.element_size() for _, x in worker.iter_weights(dtype))
    conn.send(("ready", total, len(meta)))

    def call_engine(name: str) -> Any:
        conn.send(("call", name, {}))
        kind, value = conn.recv()
        if kind == "error":
            raise RuntimeError(f"engine call {name} failed:\n{value}")
        return value

    for method in a["methods"]:
        row: dict[str, Any] = {"method": method, "buffer_bytes": a["buffer_bytes"]}
        try:
            if method == "floor_cast_copy":
                pairs = [(torch.empty(p.shape, dtype=dtype, device=p.device), p.detach()) for p in params]

                def run(pairs=pairs) -> None:
                    for d, t in pairs:
                        d.copy_(t)

                cold, times = _time(run, repeats, device)
                row.update(cold_s=cold, times_s=times, correct=all(torch.equal(d, t.to(dtype)) for d, t in pairs))
            else:
                sender = RefitSender(address=a["address"], token=a["token"], job_dir=a["job_dir"], device=device,
                                     buffer_bytes=a["buffer_bytes"], timeout_s=a["timeout"])
                conn.send(("serve", repeats + 2, "direct"))
                stats, times = [], []
                for i in range(repeats + 2):
                    perturb()
                    if i == repeats + 1:
                        sent = weights_fps()
                    t = time.perf_counter()
                    if method == "policy_gather_clone":
                        stats.append(sender.stream(worker.iter_weights(dtype), meta))
                    else:
                        resident = worker.resident_weights(dtype) if method == "policy" else None
                        stats.append(sender.stream(worker.refit_sources(dtype), meta, resident=resident))
                    _sync(device)
                    times.append(time.perf_counter() - t)
                received, engine_params = call_engine("colocate_fingerprints")
                sender.close()
                call_engine("colocate_drop_buffers")
                row.update(_sender_stats(stats[1:-1]))
                params_ok, compared = engine_params_match(engine_params, sent)
                row.update(cold_s=times[0], times_s=times[1:-1], correct=received == sent and params_ok,
                           received_equal=received == sent, params_compared=compared)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()
        conn.send(("row", row))
    conn.send(("done",))


def policy_trainer_main(conn, args: dict[str, Any]) -> None:
    report_fatal(conn, _policy_trainer, args)


# ---- the engine process (this one) ----------------------------------------------------------------------


def _serve_engine(llm, conn, proc) -> list[dict[str, Any]]:
    rows = []
    receiver_load_s: list[float] = []  # per "serve", the engine's median time inside its loads
    while True:
        if not conn.poll(1.0):
            if not proc.is_alive():
                raise RuntimeError(f"trainer process died (exit code {proc.exitcode})")
            continue
        msg = conn.recv()
        kind = msg[0]
        if kind == "serve":
            n, mode = msg[1], msg[2]
            llm.collective_rpc("colocate_refit_set_load_mode", args=(mode,))
            loads = []
            for i in range(n):
                llm.collective_rpc("colocate_refit_set_record", args=(i == n - 1,))
                [stats] = llm.collective_rpc("colocate_refit_receive")
                loads.append(stats["load_seconds"])
            llm.collective_rpc("colocate_refit_set_load_mode", args=("direct",))
            receiver_load_s.append(statistics.median(loads[1:-1] or loads))
        elif kind == "call":
            name, kwargs = msg[1], msg[2]
            try:
                if name == "colocate_fingerprints":
                    [received] = llm.collective_rpc("colocate_received_fingerprints")
                    [params] = llm.collective_rpc("colocate_param_fingerprints")
                    value = (received, params)
                elif name == "colocate_drop_buffers":
                    value = llm.collective_rpc("colocate_refit_drop_buffers")
                else:
                    value = getattr(llm, name)(**kwargs)
                conn.send(("ok", value))
            except Exception:
                conn.send(("error", traceback.format_exc()))
        elif kind == "row":
            rows.append(msg[1])
            r = msg[1]
            if r["method"].split("@")[0] in REFIT_METHODS + POLICY_METHODS and receiver_load_s:
                r["receiver_load_s"] = receiver_load_s.pop()
            status = r.get("error") or r.get("skipped") or f"median {statistics.median(r['times_s']) * 1e3:.2f} ms"
            print(f"  {r['method']:<22} {status}", file=sys.stderr, flush=True)
        elif kind == "done":
            return rows
        elif kind == "fatal":
            raise RuntimeError(f"trainer process failed:\n{msg[1]}")


def plan_run(args: argparse.Namespace, known: tuple[str, ...]) -> tuple[list[str], str, Path, bool, Any]:
    """What a run of the refit benches times, checked before anything starts: (methods, dtype, model
    directory, whether it holds weights, the (name, shape) of every tensor)."""
    training = getattr(args, "policy", "none") != "none"
    if getattr(args, "policy", "none") == "megatron":
        if args.device != "cuda":
            raise SystemExit("--policy megatron runs on CUDA only (megatron-core's model code)")
        known = tuple(m for m in known if m != "policy_gather_clone")  # an FSDP2 path
    methods = [m.strip() for m in (args.methods or ",".join(known)).split(",") if m.strip()]
    unknown = sorted(set(methods) - set(known))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(known)}")
    # In training the engine is bf16 beside fp32 master weights, on CPU too (the cast is part of the path).
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" or training else "float32")
    model_dir, has_weights = resolve_model(args.model)
    if training and not has_weights:
        raise SystemExit(f"--policy {args.policy} needs weights in --model ({model_dir}); build random ones with "
                         "python -m colocate.models.random_init --shapes <shape set> --out DIR")
    return methods, dtype, model_dir, has_weights, param_meta(model_dir, getattr(torch, dtype))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from colocate.engine.vllm_engine import make_llm, shutdown_llm

    training = args.policy != "none"
    methods, dtype, model_dir, has_weights, meta = plan_run(args, TRAINING_METHODS if training else ALL_METHODS)
    job_dir, token = new_job_dir(), new_token()
    extra: dict[str, Any] = {}
    if args.device == "cuda" and any(m in NATIVE_METHODS for m in methods):
        from colocate.bench.vllm_native import ENGINE_KWARGS

        extra.update(ENGINE_KWARGS)
    t = time.perf_counter()
    llm = make_llm(str(model_dir), dtype=dtype, load_format="auto" if has_weights else "dummy", seed=0,
                   max_model_len=256, kv_cache_memory_bytes=(1 << 30) if args.device == "cuda" else None,
                   worker_extension_cls=EXT, skip_tokenizer_init=True, extra_engine_kwargs=extra)
    print(f"engine up in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    [info] = llm.collective_rpc("colocate_refit_open", args=("zmq",), kwargs=dict(
        job="bench", token=token, job_dir=job_dir, timeout_s=args.timeout))
    address = info["address"]
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    buffer_bytes = int(args.buffer_mb * (1 << 20))
    proc = ctx.Process(target=policy_trainer_main if training else trainer_main, daemon=True, args=(child, dict(
        device=args.device, meta=meta, dtype=dtype, repeats=args.repeats, methods=methods, address=address,
        token=token, job_dir=job_dir, buffer_bytes=buffer_bytes, timeout=args.timeout, model_dir=str(model_dir),
        policy=args.policy,
        sweep_mb=[float(x) for x in args.sweep_mb.split(",") if x.strip()])))
    proc.start()
    try:
        kind, *ready = conn.recv()
        if kind == "fatal":
            raise RuntimeError(ready[0])
        total_bytes, n_tensors = ready
        print(f"{args.model}: {n_tensors} tensors, {total_bytes / 1e9:.2f} GB {dtype}", file=sys.stderr)
        rows = _serve_engine(llm, conn, proc)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        llm.collective_rpc("colocate_refit_close")
        shutdown_llm(llm)
        shutil.rmtree(job_dir, ignore_errors=True)
    return _report(args, dtype, total_bytes, n_tensors, buffer_bytes, rows)


def _report(args, dtype, total_bytes, n_tensors, buffer_bytes, rows, *,
            prog: str = "colocate.bench.refit") -> dict[str, Any]:
    """Medians, GB/s and ratio to `floor` per row, with the run's device, software, date and command."""
    floor = next((statistics.median(r["times_s"]) for r in rows
                  if r["method"] in ("floor", "floor_cast_copy", "floor_gather") and "times_s" in r), None)
    for r in rows:
        if "times_s" in r:
            med = statistics.median(r["times_s"])
            r["median_s"] = med
            r["min_s"] = min(r["times_s"])
            r["gb_per_s"] = total_bytes / med / 1e9
            r["ratio_to_floor"] = med / floor if floor else None
        r.setdefault("correct", None)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else _cpu_name()
    return {
        "device": device,
        "model": args.model,
        "mode": _MODES.get(getattr(args, "policy", "none"), "tensors"),
        "dtype": dtype,
        "bytes": total_bytes,
        "tensors": n_tensors,
        "buffer_bytes": buffer_bytes,
        "repeats": args.repeats,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": f"python -m {prog} " + " ".join(sys.argv[1:]),
        "software": _versions(),
        "results": rows,
    }


_MODES = {"fsdp2": "in-training (one-rank FSDP2 policy)", "megatron": "in-training (one-rank Megatron-core policy)"}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


def _versions() -> dict[str, str]:
    import vllm

    return {"torch": torch.__version__, "vllm": vllm.__version__}


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['model']} ({report['tensors']} tensors, {report['bytes'] / 1e9:.2f} GB {report['dtype']}) "
          f"on {report['device']}, median of {report['repeats']}")
    print(f"{'method':<22}{'median ms':>11}{'GB/s':>9}{'x floor':>9}  correct")
    for r in report["results"]:
        if "median_s" in r:
            ratio = f"{r['ratio_to_floor']:.2f}" if r.get("ratio_to_floor") else "-"
            print(f"{r['method']:<22}{r['median_s'] * 1e3:>11.2f}{r['gb_per_s']:>9.1f}{ratio:>9}  {r['correct']}")
        else:
            print(f"{r['method']:<22}  {r.get('skipped') or r.get('error')}")


def plot(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
    except ImportError:  # the GPU machines may lack it: `--replot out.json` draws it later elsewhere
        print(f"matplotlib missing: no plot written to {path}", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if "median_s" in r]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    names = [r["method"] for r in rows][::-1]
    ms = [r["median_s"] * 1e3 for r in rows][::-1]
    colors = ["tab:green" if n.startswith("colocate") else "tab:gray" if n.startswith("floor") else "tab:orange"
              for n in names]
    ax.barh(names, ms, color=colors)
    for y, v in enumerate(ms):
        ax.text(v, y, f" {v:.1f} ms", va="center")
    ax.set_xlabel("median refit time (ms)")
    ax.set_title(f"{report['model']}: {report['bytes'] / 1e9:.2f} GB {report['dtype']} on {report['device']}")
    ax.set_xlim(0, max(ms) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_buffer_sweep(report: dict[str, Any], path: str) -> bool:
    """Refit time against buffer size, from the `colocate` rows of a run with --sweep-mb."""
    pts = sorted((r["buffer_bytes"] / (1 << 20), r["median_s"] * 1e3) for r in report["results"]
                 if r["method"].split("@")[0] == "colocate" and "median_s" in r)
    if len(pts) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:green", label="colocate")
    for r in report["results"]:
        if r["method"] in FLOOR_METHODS and "median_s" in r:
            ax.axhline(r["median_s"] * 1e3, ls="--", color="gray")
            ax.text(pts[0][0], r["median_s"] * 1e3, f" {r['method']}", va="bottom", color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("buffer size (MiB, each of two)")
    ax.set_ylabel("median refit time (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{report['model']} on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(args: argparse.Namespace, report: dict[str, Any], extra_plot=None) -> None:
    """Print the table; with --json, write the report and the plot(s) beside it (--replot: only the plots,
    beside the JSON read); --plot names the main PNG. `extra_plot(report, path_stem)` adds a plot."""
    print_table(report)
    base = args.replot or args.json_path
    if args.json_path and not args.replot:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=1))
    if base:
        plot(report, args.plot or str(Path(base).with_suffix(".png")))
        if extra_plot is not None:
            extra_plot(report, str(Path(base).with_suffix("")))
    elif args.plot:
        plot(report, args.plot)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    report = json.loads(Path(args.replot).read_text()) if args.replot else run(args)
    write_outputs(args, report, extra_plot=lambda r, stem: plot_buffer_sweep(r, stem + "_buffers.png"))
    return report


if __name__ == "__main__":
    main()
