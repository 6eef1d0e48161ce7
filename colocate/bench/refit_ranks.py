"""Refit benchmark over several devices, one policy rank per device: `--engines` E vLLM engines of
`--engine-tp` T workers each, each in a process of its own, and K = E * T trainer processes, trainer r on
the device of worker r (engine r // T, TP rank r % T; GPU r; on CPU all share the host), each holding the
whole model (as every FSDP2 rank does once it has gathered) and refitting the worker beside it, all at once.
A tensor-parallel engine (T > 1) is refit shard-sliced by default; data-parallel engines (T = 1) each take
the whole model.

    python -m colocate.bench.refit_ranks --device cuda --model llama3-8b --engine-tp 2 --repeats 20 --json out.json
    python -m colocate.bench.refit_ranks --device cpu --model tiny --engine-tp 2 --repeats 3 --json out.json
    python -m colocate.bench.refit_ranks --device cuda --model /tmp/qwen-random --engine-tp 2 --policy fsdp2 \
        --json o.json
    python -m colocate.bench.refit_ranks --device cuda --model /tmp/llama-random --engines 2 --engine-tp 1 \
        --policy fsdp2 --json o.json       # FSDP2 over 2 GPUs into 2 colocated engines (issue #15's 2-GPU row)

Methods (warm-up first, then `--repeats` timed refits; a refit's time is its slowest rank's):
  colocate        the default: shard-sliced, each trainer packs only the slice of each weight its worker
                  keeps (as the worker's own loader says), through the ping-pong buffers
  colocate_whole  `refit.shard_slice=false`: every trainer packs every tensor whole; vLLM's loader slices
  colocate_in_place  GPU: the one-copy path (each worker reads its slices straight from the trainer's tensors)
  floor           one process per rank: one device copy of each rank's slices (what a sliced refit must move)
  floor_whole     one process per rank: one device copy of every tensor, whole
In-training mode (`--policy fsdp2`; `--model` a directory with weights, or tiny): the K trainers are one real
FSDP2 policy over K ranks (fp32 master weights, bf16 compute), its weights changed in place before every
refit; each rank's fills all-gather a module's shards (collectives, every rank in step) and copy out what
its worker keeps:
  policy          shard-sliced (the default path)
  policy_whole    `refit.shard_slice=false`
  floor_gather    one process per rank: every shard cast into one input, one all-gather of the whole model,
                  each rank's slices copied out (the collective and the copy any refit from FSDP must make)
`correct`: after one more, recorded refit, what each worker was handed equals the trainer's tensor or the
slice of it named (CPU: sha256; GPU: on-device word sums). `sent_mb`: the bytes each rank packed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
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

from colocate.bench.refit import (
    EXT,
    _free_port,
    _make_tensors,
    _report,
    _time,
    fsdp2_trainer,
    plan_run,
    report_fatal,
    write_outputs,
)
from colocate.refit.ipc.jobdir import new_job_dir, new_token

METHODS = ("colocate", "colocate_whole", "colocate_in_place", "floor", "floor_whole")
TRAINING_METHODS = ("policy", "policy_whole", "floor_gather")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m colocate.bench.refit_ranks", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="tiny", help="tiny | llama3-8b | qwen2.5-1.5b | a HF directory")
    p.add_argument("--engine-tp", type=int, default=2, help="each engine's tensor-parallel size")
    p.add_argument("--engines", type=int, default=1, help="data-parallel engines (each on --engine-tp devices)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--buffer-mb", type=float, default=1024, help="size of each of the two ping-pong buffers")
    p.add_argument("--methods", default=None, help="default: every method of the mode")
    p.add_argument("--policy", choices=["none", "fsdp2"], default="none",
                   help="fsdp2: the in-training mode (the trainers are one FSDP2 policy over --engine-tp ranks)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--plot", default=None, help="PNG path (default: beside --json)")
    p.add_argument("--replot", default=None, metavar="JSON", help="only draw the PNG of an earlier run")
    return p.parse_args(argv)


def _expected(tensors: dict[str, torch.Tensor], received: dict[str, str]) -> dict[str, str]:
    """What each received fingerprint should be: of the tensor, or of the slice it names."""
    from colocate.refit.checksum import expected_fingerprint

    return {name: expected_fingerprint(tensors[name], fp) for name, fp in received.items()}


def _sent(timed: list, received: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A refit row's sender figures (medians of the timed refits) and whether the worker got what was sent."""
    return dict(sent_bytes=timed[0].bytes, sliced=timed[0].sliced, one_copy=timed[0].one_copy,
                correct=received == _expected(tensors, received),
                sender_gather_s=statistics.median(x.gather_seconds for x in timed),
                sender_pack_s=statistics.median(x.pack_seconds for x in timed),
                sender_wait_s=statistics.median(x.wait_seconds for x in timed))


def trainer_main(conn, rank: int, args: dict[str, Any]) -> None:
    report_fatal(conn, _policy_trainer if args["policy"] == "fsdp2" else _trainer, rank, args)


def _policy_trainer(conn, rank: int, a: dict[str, Any]) -> None:
    """The in-training mode's trainer: rank `rank` of an FSDP2 policy over every trainer (module docstring)."""
    from colocate.refit.ipc.sender import RefitSender

    ranks, dtype = len(a["addresses"]), getattr(torch, a["dtype"])
    worker, meta, perturb = fsdp2_trainer(a["model_dir"], a["device"], dtype, rank, ranks, a["master_port"])
    device = worker.device

    total = sum(x.numel() * x.element_size() for _, x in worker.iter_weights(dtype))
    conn.send(("ready", total, len(meta)))
    slices = None
    for method in a["methods"]:
        row: dict[str, Any] = {"method": method}
        try:
            if method == "floor_gather":
                if slices is None:
                    raise RuntimeError("floor_gather needs the slices: run policy first")
                row.update(_floor_gather(worker, meta, slices, dtype, a["repeats"]))
            else:
                sender = RefitSender(address=a["addresses"][rank], token=a["token"], job_dir=a["job_dir"],
                                     device=device.type, buffer_bytes=a["buffer_bytes"], timeout_s=a["timeout"],
                                     shard_slice=method == "policy")
                conn.send(("serve", a["repeats"] + 2))
                stats, times = [], []
                for _ in range(a["repeats"] + 2):
                    perturb()
                    t = time.perf_counter()
                    stats.append(sender.stream(worker.refit_sources(dtype), meta))
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - t)
                if method == "policy":
                    slices = sender.slices or [None] * len(meta)
                received = conn.recv()
                sent = {n: t for n, t in worker.iter_weights(dtype)}  # a collective: every rank, in step
                sender.close()
                row.update(cold_s=times[0], times_s=times[1:-1], **_sent(stats[1:-1], received, sent))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()
        conn.send(("row", row))
    conn.send(("done",))


def _trainer(conn, rank: int, a: dict[str, Any]) -> None:
    from colocate.refit.ipc.sender import RefitSender
    from colocate.refit.plan import tensor_meta

    device = a["device"]
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    tensors = _make_tensors(a["meta"], getattr(torch, a["dtype"]), device, seed=1)  # the same on every rank
    meta = tensor_meta(tensors)
    by_name = dict(tensors)
    conn.send(("ready", sum(t.numel() * t.element_size() for _, t in tensors), len(tensors)))
    slices = None
    for method in a["methods"]:
        row: dict[str, Any] = {"method": method}
        try:
            if method.startswith("floor"):
                if method == "floor" and slices is None:
                    raise RuntimeError("floor needs the slices: run colocate first")
                src = [t if method == "floor_whole" or p is None else p.of(t)
                       for (_, t), p in zip(tensors, slices or [None] * len(tensors), strict=True)]
                dst = [torch.empty(s.shape, dtype=s.dtype, device=device) for s in src]

                def copy(dst=dst, src=src) -> None:
                    for d, s in zip(dst, src, strict=True):
                        d.copy_(s)

                cold, times = _time(copy, a["repeats"], device)
                row.update(cold_s=cold, times_s=times, sent_bytes=sum(s.numel() * s.element_size() for s in src),
                           correct=all(torch.equal(d, s) for d, s in zip(dst, src, strict=True)))
            elif method == "colocate_in_place" and device == "cpu":
                row["skipped"] = "the one-copy path is CUDA only"
            else:
                sender = RefitSender(address=a["addresses"][rank], token=a["token"], job_dir=a["job_dir"],
                                     device=device, buffer_bytes=a["buffer_bytes"], timeout_s=a["timeout"],
                                     shard_slice=method != "colocate_whole")
                resident = tensors if method == "colocate_in_place" else None
                conn.send(("serve", a["repeats"] + 2))
                stats = []

                def one(s=sender, out=stats, r=resident) -> None:
                    out.append(s.stream(iter(tensors), meta, resident=r))

                cold, times = _time(one, a["repeats"], device)
                sender.stream(iter(tensors), meta, resident=resident)
                if method == "colocate":
                    slices = sender.slices
                received = conn.recv()  # what the worker beside us was handed in that last refit
                sender.close()
                row.update(cold_s=cold, times_s=times, **_sent(stats[1:], received, by_name))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()
        conn.send(("row", row))
    conn.send(("done",))


def _floor_gather(worker, meta, slices, dtype: torch.dtype, repeats: int) -> dict[str, Any]:
    """Every shard cast into one input, one all-gather of the whole model, this rank's slices (or the whole
    tensors it keeps whole) copied out: the collective and the copy a refit from FSDP2 must make."""
    import torch.distributed as dist

    from colocate.policy.weights import _copy_slice, _local, _state_refs

    device, world = worker.device, worker.world_size
    refs = [(n, _local(getattr(m, attr))) for n, m, attr in _state_refs(worker.model)]
    piece = dict(zip((n for n, _, _ in meta), slices, strict=True))
    full = {n: tuple(s) for n, _, s in meta}
    bounds = [0]
    for _, x in refs:
        bounds.append(bounds[-1] + x.numel())
    spans = list(itertools.pairwise(bounds))
    shards = torch.empty(bounds[-1], dtype=dtype, device=device)
    block = torch.empty(world * bounds[-1], dtype=dtype, device=device)
    outs = [torch.empty(piece[n].shape(full[n]) if piece[n] else full[n], dtype=dtype, device=device)
            for n, _ in refs]

    def gather_copy() -> None:
        torch._foreach_copy_([shards[lo:hi].view(x.shape) for (lo, hi), (_, x) in zip(spans, refs, strict=True)],
                             [x for _, x in refs])
        dist.all_gather_into_tensor(block, shards)
        rows = block.view(world, bounds[-1])
        for (n, _), (lo, hi), out in zip(refs, spans, outs, strict=True):
            if piece[n] is None:
                out.view(world, hi - lo).copy_(rows[:, lo:hi])
            else:
                _copy_slice(out, rows[:, lo:hi], full[n], piece[n])

    cold, times = _time(gather_copy, repeats, str(device))
    whole = dict(worker.iter_weights(dtype))  # a collective: every rank, in step
    return dict(cold_s=cold, times_s=times, sent_bytes=sum(o.numel() * o.element_size() for o in outs),
                correct=all(torch.equal(o, piece[n].of(whole[n]) if piece[n] else whole[n])
                            for (n, _), o in zip(refs, outs, strict=True)))


def _merge(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from every rank's: each repeat's time is the slowest rank's; bytes per rank, the most."""
    first = rows[0]
    bad = next((r for r in rows if "error" in r or "skipped" in r), None)
    if bad is not None:
        return {"method": first["method"], **{k: v for k, v in bad.items() if k != "method"}}
    out = {"method": first["method"], "ranks": len(rows),
           "times_s": [max(ts) for ts in zip(*(r["times_s"] for r in rows), strict=True)],
           "cold_s": max(r["cold_s"] for r in rows), "correct": all(r["correct"] for r in rows),
           "sent_mb_per_rank": max(r["sent_bytes"] for r in rows) / 2**20}
    for key in ("sliced", "one_copy", "sender_gather_s", "sender_pack_s", "sender_wait_s"):
        if key in first:
            out[key] = first[key] if not isinstance(first[key], float) else max(r[key] for r in rows)
    return out


def engine_main(conn, index: int, a: dict[str, Any]) -> None:
    report_fatal(conn, _engine, index, a)


def _engine(conn, index: int, a: dict[str, Any]) -> None:
    """Engine `index` in a process of its own, on GPUs index * tp .. + tp - 1: opens its workers' receivers,
    then serves refits when told and reports what each worker was handed."""
    tp = a["engine_tp"]
    if a["device"] == "cuda":  # before CUDA is first touched in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(index * tp + r) for r in range(tp))
        # vLLM forks its TP workers unless told otherwise, and this process has CUDA set up by then (measured
        # on an H200 pair: "Cannot re-initialize CUDA in forked subprocess"); in a Ray actor vLLM spawns itself.
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    from colocate.engine.vllm_engine import make_llm, shutdown_llm

    llm = make_llm(a["model_dir"], dtype=a["dtype"], load_format="auto" if a["has_weights"] else "dummy", seed=0,
                   max_model_len=256, kv_cache_memory_bytes=(1 << 30) if a["device"] == "cuda" else None,
                   tensor_parallel_size=tp, worker_extension_cls=EXT, skip_tokenizer_init=True)
    infos = llm.collective_rpc("colocate_refit_open", args=("zmq",), kwargs=dict(
        job="bench", token=a["token"], job_dir=a["job_dir"], timeout_s=a["timeout"]))
    conn.send(("addresses", [i["address"] for i in infos]))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                return
            n = msg[1]
            for i in range(n):
                llm.collective_rpc("colocate_refit_set_record", args=(i == n - 1,))
                llm.collective_rpc("colocate_refit_receive")
            conn.send(("received", llm.collective_rpc("colocate_received_fingerprints")))
    finally:
        llm.collective_rpc("colocate_refit_close")
        shutdown_llm(llm)


def _recv(conn, procs) -> tuple:
    """The next message from a child, raising at once if any child died or failed."""
    while not conn.poll(1.0):
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            raise RuntimeError(f"a benchmark process died (exit code {dead[0].exitcode})")
    msg = conn.recv()
    if msg[0] == "fatal":
        raise RuntimeError(f"a benchmark process failed:\n{msg[1]}")
    return msg


def _coordinate(engines, trainers, procs) -> list[dict[str, Any]]:
    """Run the trainers' methods in step: a method starts once every trainer asked for it (then every engine
    serves its refits) or sent its row (a floor, no engine); trainer r hears what the r-th worker was handed."""
    rows: list[dict[str, Any]] = []
    while True:
        msgs = [_recv(c, procs) for c in trainers]
        kinds = {m[0] for m in msgs}
        if kinds == {"done"}:
            return rows
        if kinds == {"serve"}:
            for e in engines:
                e.send(("serve", msgs[0][1]))
            received = [got for e in engines for got in _recv(e, procs)[1]]  # engine-major, then TP rank
            for conn, got in zip(trainers, received, strict=True):
                conn.send(got)
            msgs = [_recv(c, procs) for c in trainers]
        if {m[0] for m in msgs} != {"row"}:
            raise RuntimeError(f"trainers out of step: {[m[0] for m in msgs]}")
        row = _merge([m[1] for m in msgs])
        status = row.get("error") or row.get("skipped") or f"median {statistics.median(row['times_s']) * 1e3:.2f} ms"
        print(f"  {row['method']:<20} {status}", file=sys.stderr, flush=True)
        rows.append(row)


def run(args: argparse.Namespace) -> dict[str, Any]:
    training = args.policy == "fsdp2"
    methods, dtype, model_dir, has_weights, meta = plan_run(args, TRAINING_METHODS if training else METHODS)
    first, floor = ("policy", "floor_gather") if training else ("colocate", "floor")
    if floor in methods and (first not in methods or methods.index(floor) < methods.index(first)):
        raise SystemExit(f"the {floor} row copies the slices `{first}` was told: list {first} before {floor}")
    tp, n_engines = args.engine_tp, args.engines
    ranks = tp * n_engines
    if args.device == "cuda" and torch.cuda.device_count() < ranks:
        raise SystemExit(f"{n_engines} engine(s) of TP {tp} need {ranks} GPUs, {torch.cuda.device_count()} visible")
    job_dir, token = new_job_dir(), new_token()
    shared = dict(device=args.device, meta=meta, dtype=dtype, repeats=args.repeats, methods=methods,
                  token=token, job_dir=job_dir, buffer_bytes=int(args.buffer_mb * (1 << 20)), timeout=args.timeout,
                  policy=args.policy, model_dir=str(model_dir), has_weights=has_weights, engine_tp=tp,
                  master_port=_free_port())
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    engines, trainers = [], []
    t = time.perf_counter()
    try:
        for e in range(n_engines):
            conn, child = ctx.Pipe()
            # not a daemon: a TP engine starts worker processes of its own (killed in `finally` if need be)
            procs.append(ctx.Process(target=engine_main, args=(child, e, shared)))
            procs[-1].start()
            engines.append(conn)
        shared["addresses"] = [a for conn in engines for a in _recv(conn, procs)[1]]
        print(f"{n_engines} engine(s) of TP {tp} up in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
        for r in range(ranks):
            conn, child = ctx.Pipe()
            procs.append(ctx.Process(target=trainer_main, args=(child, r, shared), daemon=True))
            procs[-1].start()
            trainers.append(conn)
        ready = [_recv(c, procs) for c in trainers]
        _, total_bytes, n_tensors = ready[0]
        print(f"{args.model}: {n_tensors} tensors, {total_bytes / 1e9:.2f} GB {dtype}", file=sys.stderr)
        rows = _coordinate(engines, trainers, procs)
    finally:
        for conn in engines:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
        shutil.rmtree(job_dir, ignore_errors=True)
    report = _report(args, dtype, total_bytes, n_tensors, shared["buffer_bytes"], rows,
                     prog="colocate.bench.refit_ranks")
    trainers_are = f"an FSDP2 policy over {ranks} ranks" if training else f"{ranks} trainers"
    report.update(mode=f"{n_engines} engine(s) of TP {tp}, {trainers_are} (one per device)", engine_tp=tp,
                  engines=n_engines)
    if args.device == "cuda":
        report["device"] = f"{ranks} x {report['device']}"
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    report = json.loads(Path(args.replot).read_text()) if args.replot else run(args)
    write_outputs(args, report)
    return report


if __name__ == "__main__":
    main()
