"""Will a refit of this checkpoint be exact?  `python -m colocate.check MODEL_DIR [MODEL_DIR ...] [--refit]`

Static (the default; seconds, no GPU, no weights loaded): the policy's model and vLLM's are both built on the
meta device; every tensor the policy exports (in checkpoint layout) is dry-run through vLLM's own loader
(`engine.accepts`): it must land on an engine parameter with its shape, and every engine parameter must be
filled. Prints the counts and the first mismatches.

`--refit` (end to end): for each transport, builds the policy (`--policy fsdp2`, the default, or `megatron` with
`--tp` / `--pp`) on `--workers` ranks and vLLM engines for the checkpoint on Ray (zmq: colocated, one engine per
policy rank; broadcast: split placement, one engine on a device of its own), perturbs every policy weight,
refits, and compares every engine's greedy tokens and the logprobs of the tokens it chose with HF
transformers on the policy's weights, exported to HF and run on policy rank 0's device (`colocate/verify.py`).
A table per check.

Exit code: 0 everything matches, 1 a mismatch, 2 a model cannot be checked (a one-line reason). Several
directories are checked in one process (vLLM and Ray start once); the code is the worst of theirs.

    python -m colocate.check /path/to/Qwen2.5-1.5B
    python -m colocate.check /path/to/model --refit --device cuda --transport zmq
    python -m colocate.check /path/to/model --refit --device cuda --transport zmq --policy megatron --tp 2 --workers 2
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from colocate.engine.accepts import OfferCheck
from colocate.models.checkpoint_format import UnsupportedModelError
from colocate.verify import LOGPROB_TOL, check_engines

PROMPTS = ["Q: 12+7= A:", "The answer is", "what", "Q: 93-40= A:"]


class CheckError(Exception):
    """The model cannot be checked (exit code 2)."""


@dataclass
class Report:
    ok: bool
    rows: list[dict[str, Any]] = field(default_factory=list)


def _config(model_dir: str) -> Any:
    from transformers import AutoConfig

    if not (Path(model_dir) / "config.json").is_file():
        raise CheckError(f"{model_dir}: no config.json (not a local HF checkpoint directory)")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as e:
        raise CheckError(f"{model_dir}: config.json does not load: {type(e).__name__}: {e}") from e


def policy_offer(model_dir: str, dtype: torch.dtype, backend: str = "fsdp2") -> list[tuple[str, str, tuple[int, ...]]]:
    """What the policy streams for this checkpoint: (checkpoint name, dtype, shape), from a meta-device model
    (FSDP2) or from the config through the Megatron conversion (what `MegatronPolicyWorker.weights_manifest`
    returns; it does not depend on tp / pp)."""
    from transformers import AutoModelForCausalLM

    from colocate.policy.weights import weights_manifest
    from colocate.refit.plan import manifest_meta_of

    if backend == "megatron":
        from colocate.policy.megatron.convert import dims_from_hf_config, export_order, hf_shapes
        from colocate.policy.megatron.errors import MegatronModelError

        try:
            dims = dims_from_hf_config(_config(model_dir))
        except MegatronModelError as e:
            raise CheckError(f"the Megatron policy does not convert this model: {e}") from e
        shapes = hf_shapes(dims)
        return manifest_meta_of([(n, shapes[n], dtype) for m in export_order(dims) for n in m.hf])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(model_dir), dtype=dtype)
    return manifest_meta_of(weights_manifest(model, dtype))


def static_check(model_dir: str, backend: str = "fsdp2") -> tuple[OfferCheck, int]:
    """The dry run of the policy's offer against vLLM's model, both on meta; (result, tensors offered)."""
    from colocate.engine.accepts import check_offer, meta_engine_model

    try:
        engine_model, dtype = meta_engine_model(model_dir)
    except Exception as e:
        raise CheckError(f"vLLM cannot build this model: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    offer = policy_offer(model_dir, dtype, backend)
    return check_offer(engine_model, offer, use_reload_metadata=False), len(offer)


# ------------------------------------------------------------------------------------------ end to end
def perturb(worker: Any, seed: int, scale: float) -> int:
    """Add noise of `scale` times each tensor's mean magnitude to every local shard; runs on each policy rank.

    FSDP2 ranks hold disjoint shards: each draws its own noise (seed + 1000 * rank). Megatron ranks of one
    pipeline stage hold the same list of parameters (tensor-rank slices of equal shapes, replicated norms,
    data-parallel replicas): they draw the same noise (seed + 1000 * stage), so norms and replicas stay equal
    and every rank's `iter_weights` (what each colocated engine gets) is what rank 0 exports."""
    stage = getattr(worker, "pp_rank", None)  # only the Megatron worker has one
    gen = torch.Generator().manual_seed(seed + 1000 * (worker.rank if stage is None else stage))
    n = 0
    with torch.no_grad():
        for p in worker.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            noise = torch.randn(local.shape, generator=gen, dtype=torch.float32).to(local)
            local.add_(noise * scale * (local.abs().mean() + 1e-3))
            n += 1
    return n


def _prompt_ids(model_dir: str) -> list[list[int]]:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        return [tok(p)["input_ids"] for p in PROMPTS]
    except Exception:  # no tokenizer: fixed token ids
        return [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]


def refit_check(model_dir: str, *, device: str, transport: str, dtype: str, max_tokens: int,
                seed: int = 0, timeout_s: float = 120.0, verbose: bool = False, policy: str = "fsdp2",
                tp: int = 1, pp: int = 1, workers: int = 1, engine_tp: int = 1) -> dict[str, Any]:
    """One transport end to end (see the module docstring); a table row. `engine_tp`: each engine spans that
    many devices (colocated: workers // engine_tp engines, each TP rank beside a policy rank)."""
    from colocate import cluster as clusters
    from colocate.config import Config

    cfg = Config()
    cfg.placement.device = device
    cfg.placement.mode = "colocated" if transport == "zmq" else "split"
    cfg.placement.ray_address = "local"
    cfg.placement.num_cpus = max(4, workers + 2)
    cfg.placement.policy_workers = workers
    cfg.placement.generation_workers = workers // engine_tp if transport == "zmq" else 1
    cfg.generation.tensor_parallel_size = engine_tp
    cfg.policy.backend = policy
    cfg.policy.tensor_parallel_size, cfg.policy.pipeline_parallel_size = tp, pp
    cfg.policy.param_dtype = dtype
    cfg.generation.dtype = dtype
    cfg.generation.max_model_len = 256
    cfg.refit.transport = transport
    cfg.refit.buffer_size_mb = 1.0  # many buckets, and fused parameters split across them
    cfg.refit.timeout_s = timeout_s
    row: dict[str, Any] = {"check": f"refit over {transport}", "device": device, "dtype": dtype}
    if (policy, workers, engine_tp) != ("fsdp2", 1, 1):
        row |= {"policy": policy, "tp": tp, "pp": pp, "workers": workers, "engine_tp": engine_tp}
    clusters.connect("local", cfg.placement.num_cpus, log_to_driver=verbose)
    say = functools.partial(print, f"[{Path(model_dir).name} {transport}]", file=sys.stderr, flush=True)
    say("starting the policy and the engine")
    cluster = clusters.build(cfg, model_dir, job=f"check-{transport}-{int(time.time())}")
    try:
        prompt_ids = _prompt_ids(model_dir)
        row["perturbed_tensors"] = cluster.policy.execute(perturb, seed, 0.05)[0]
        say(f"perturbed {row['perturbed_tensors']} tensors; refitting")
        t = time.perf_counter()
        parts = cluster.refit()
        row["refit_ms"] = round((time.perf_counter() - t) * 1e3, 1)
        if parts.get("refit_sliced"):  # TP engines, colocated: each policy rank sent its worker's slices
            row["sliced_tensors"] = parts["refit_sliced"]
        if "refit_sent_mb" in parts:
            row["sent_mb_per_rank"] = round(parts["refit_sent_mb"], 2)
        say("refit done; every engine generates, HF transformers on policy rank 0 runs on the exported weights")
        verdicts = check_engines(cluster.policy, cluster.generation, prompt_ids=prompt_ids, max_tokens=max_tokens,
                                 dtype=dtype, device=device)
    finally:
        cluster.close()
    row.update(engines=len(verdicts), prompts=sum(v.prompts for v in verdicts),
               greedy_equal=sum(v.greedy_equal for v in verdicts),
               max_logprob_diff=max(v.max_logprob_diff for v in verdicts))
    if row["greedy_equal"] < row["prompts"]:
        row.update(near_ties=sum(v.near_ties for v in verdicts),
                   max_divergence_gap=max(v.max_divergence_gap for v in verdicts))
    row["ok"] = all(v.ok for v in verdicts)
    return row


# ------------------------------------------------------------------------------------------ entry point
def check_megatron(model_dir: str, args: argparse.Namespace) -> None:
    """Before any actor starts: megatron-core and CUDA are here, and the model converts and divides over
    --tp / --pp / --workers (the checks `colocate.run` makes); CheckError with the reason otherwise."""
    from colocate.policy.megatron import preflight
    from colocate.policy.megatron.errors import MegatronLayoutError, MegatronModelError, MegatronUnavailableError

    try:
        preflight.check_available(args.device)
        preflight.check_model_layout(model_dir, tp_size=args.tp, pp_size=args.pp, world_size=args.workers)
    except (MegatronUnavailableError, MegatronModelError, MegatronLayoutError) as e:
        raise CheckError(f"{type(e).__name__}: {e}") from e


def run(model_dir: str, args: argparse.Namespace) -> Report:
    """Every check asked for on one checkpoint, each row printed as soon as it is known; raises CheckError /
    UnsupportedModelError if the model cannot be checked."""
    from colocate.engine.support import check_supported

    check_supported(_config(model_dir))
    if args.refit and args.policy == "megatron":
        check_megatron(model_dir, args)
    print(f"\n{model_dir}", flush=True)
    result, n_offered = static_check(model_dir, args.policy)
    report = Report(ok=result.ok)
    _add_row(report, {"check": "static: names and shapes", "tensors": n_offered, "engine_params": len(result.needs),
                      "ok": result.ok, "detail": result.summary()})
    if args.refit and result.ok:
        transports = ["zmq", "broadcast"] if args.transport == "both" else [args.transport]
        for transport in transports:
            need = args.workers + args.engine_tp if transport == "broadcast" else args.workers  # split: engine apart
            if args.device == "cuda" and need > 1 and torch.cuda.device_count() < need:
                _add_row(report, {"check": f"refit over {transport}", "ok": None,
                                  "detail": f"skipped: needs {need} GPUs"})
                continue
            try:
                row = refit_check(model_dir, device=args.device, transport=transport, dtype=args.dtype,
                                  max_tokens=args.max_tokens, timeout_s=args.timeout_s,
                                  verbose=args.verbose, policy=args.policy, tp=args.tp, pp=args.pp,
                                  workers=args.workers, engine_tp=args.engine_tp)
            except Exception as e:  # a refused or failed refit is a mismatch, said in one line
                row = {"check": f"refit over {transport}", "ok": False,
                       "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            _add_row(report, row)
    return report


def _add_row(report: Report, row: dict[str, Any]) -> None:
    report.rows.append(row)
    report.ok = report.ok and row["ok"] is not False
    status = {True: "ok", False: "MISMATCH", None: "skipped"}[row["ok"]]
    rest = "  ".join(f"{k}={v}" for k, v in row.items() if k not in ("check", "ok"))
    print(f"  {status:9s} {row['check']:26s} {rest}", flush=True)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The policy options as `colocate.run` would judge them (exit code 2 with the reason)."""
    from colocate.config import ConfigError, PolicyConfig, check_policy_parallel

    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.engine_tp < 1 or args.workers % args.engine_tp:
        parser.error(f"--engine-tp must divide --workers ({args.workers}), got {args.engine_tp}")
    try:
        check_policy_parallel(PolicyConfig(backend=args.policy, tensor_parallel_size=args.tp,
                                           pipeline_parallel_size=args.pp), args.workers)
    except ConfigError as e:
        parser.error(str(e).replace("placement.policy_workers", "--workers"))
    if args.policy == "megatron" and args.dtype == "float16":
        parser.error("--policy megatron: --dtype must be float32 or bfloat16")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m colocate.check", description=__doc__.splitlines()[0])
    p.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR")
    p.add_argument("--refit", action="store_true", help="also refit end to end and compare with HF")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--transport", default="both", choices=["zmq", "broadcast", "both"])
    p.add_argument("--dtype", default="float32", choices=sorted(LOGPROB_TOL),
                   help="policy and engine dtype for --refit (float32: exactness, not bf16 rounding, is checked)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout-s", type=float, default=120.0, help="the refit's timeout (a stalled peer)")
    p.add_argument("--policy", default="fsdp2", choices=["fsdp2", "megatron"], help="the policy backend")
    p.add_argument("--tp", type=int, default=1, help="Megatron tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="Megatron pipeline-parallel size")
    p.add_argument("--engine-tp", type=int, default=1,
                   help="vLLM tensor-parallel size of each engine (colocated: --workers / it engines)")
    p.add_argument("--workers", type=int, default=1,
                   help="policy ranks (a multiple of tp * pp); zmq: as many engines, one beside each rank")
    p.add_argument("--json", help="write the reports here")
    p.add_argument("--verbose", action="store_true", help="show the policy's and the engines' logs")
    args = p.parse_args(argv)
    _check_args(p, args)
    code, out = 0, {}
    for model_dir in args.model_dirs:
        try:
            report = run(model_dir, args)
        except (CheckError, UnsupportedModelError) as e:
            print(f"cannot check {model_dir}: {str(e).splitlines()[0]}", file=sys.stderr)
            out[model_dir] = {"ok": None, "error": str(e)}
            code = 2
            continue
        out[model_dir] = {"ok": report.ok, "rows": report.rows}
        code = max(code, 0 if report.ok else 1)
        if args.json:  # after each model: a run cut short keeps what it found
            Path(args.json).write_text(json.dumps(out, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
