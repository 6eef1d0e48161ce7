"""Will a refit of this checkpoint be exact?  `python -m colocate.check MODEL_DIR [MODEL_DIR ...] [--refit]`

Static (the default; seconds, no GPU, no weights loaded): the policy's model and vLLM's are both built on the
meta device; every tensor the policy exports (in checkpoint layout) is dry-run through vLLM's own loader
(`engine.accepts`): it must land on an engine parameter with its shape, and every engine parameter must be
filled. Prints the counts and the first mismatches.

`--refit` (end to end): for each transport, builds the FSDP2 policy and a vLLM engine for the checkpoint on
Ray (zmq: colocated; broadcast: split placement), perturbs every policy weight, refits, and compares the
engine's greedy tokens and the logprobs of the tokens it chose with HF transformers on the policy's weights
(exported to a temporary HF directory). A table per check.

Exit code: 0 everything matches, 1 a mismatch, 2 a model cannot be checked (a one-line reason). Several
directories are checked in one process (vLLM and Ray start once); the code is the worst of theirs.

    python -m colocate.check /path/to/Qwen2.5-1.5B
    python -m colocate.check /path/to/model --refit --device cuda --transport zmq
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from colocate.engine.accepts import OfferCheck
from colocate.models.checkpoint_format import UnsupportedModelError

PROMPTS = ["Q: 12+7= A:", "The answer is", "what", "Q: 93-40= A:"]
# Teacher-forced logprobs of the engine's tokens against HF's, per dtype the engine computes in; ten times
# that on GPU, where vLLM's kernels round differently (Qwen2.5-1.5B shapes, fp32, H200: 4.6e-3). A weight
# the refit got wrong moves them by whole nats (a Qwen3-MoE refit with fused expert names: 8.2).
LOGPROB_TOL = {"float32": 2e-3, "bfloat16": 0.1, "float16": 0.05}


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


def policy_offer(model_dir: str, dtype: torch.dtype) -> list[tuple[str, str, tuple[int, ...]]]:
    """What the policy streams for this checkpoint: (checkpoint name, dtype, shape), from a meta-device model."""
    from transformers import AutoModelForCausalLM

    from colocate.policy.weights import weights_manifest
    from colocate.refit.plan import manifest_meta_of

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(model_dir), dtype=dtype)
    return manifest_meta_of(weights_manifest(model, dtype))


def static_check(model_dir: str) -> tuple[OfferCheck, int]:
    """The dry run of the policy's offer against vLLM's model, both on meta; (result, tensors offered)."""
    from colocate.engine.accepts import check_offer, meta_engine_model

    try:
        engine_model, dtype = meta_engine_model(model_dir)
    except Exception as e:
        raise CheckError(f"vLLM cannot build this model: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    offer = policy_offer(model_dir, dtype)
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


def _hf_reference(model_dir: str, prompt_ids: list[list[int]], responses: list[list[int]], max_tokens: int,
                  device: str, dtype: torch.dtype) -> tuple[list[list[int]], list[list[float]]]:
    """HF's greedy tokens, and HF's logprobs of the engine's `responses` (teacher-forced)."""
    from transformers import AutoModelForCausalLM

    # Eager attention: the reference implementation (sdpa drops Gemma2's attention-logit soft-capping).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    model = model.to(device).eval()
    greedy, logprobs = [], []
    with torch.no_grad():
        for ids, resp in zip(prompt_ids, responses, strict=True):
            x = torch.tensor([ids], device=device)
            # Plain greedy, as the engine decodes: no penalty a checkpoint's generation_config may set.
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_tokens,
                               repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                               pad_token_id=model.config.eos_token_id)
            greedy.append(y[0, len(ids):].tolist())
            full = torch.tensor([ids + resp], device=device)
            lp = torch.log_softmax(model(full).logits[0, len(ids) - 1:-1].float(), -1)
            logprobs.append(lp.gather(-1, torch.tensor(resp, device=device)[:, None])[:, 0].tolist())
    return greedy, logprobs


def _prompt_ids(model_dir: str) -> list[list[int]]:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        return [tok(p)["input_ids"] for p in PROMPTS]
    except Exception:  # no tokenizer: fixed token ids
        return [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]


def refit_check(model_dir: str, *, device: str, transport: str, dtype: str, max_tokens: int,
                seed: int = 0, timeout_s: float = 120.0, verbose: bool = False) -> dict[str, Any]:
    """One transport end to end (see the module docstring); a table row."""
    from colocate import cluster as clusters
    from colocate.config import Config

    cfg = Config()
    cfg.placement.device = device
    cfg.placement.mode = "colocated" if transport == "zmq" else "split"
    cfg.placement.ray_address = "local"
    cfg.placement.num_cpus = 4
    cfg.policy.param_dtype = dtype
    cfg.generation.dtype = dtype
    cfg.generation.max_model_len = 256
    cfg.refit.transport = transport
    cfg.refit.buffer_size_mb = 1.0  # many buckets, and fused parameters split across them
    cfg.refit.timeout_s = timeout_s
    row: dict[str, Any] = {"check": f"refit over {transport}", "device": device, "dtype": dtype}
    clusters.connect("local", cfg.placement.num_cpus, log_to_driver=verbose)
    say = functools.partial(print, f"[{Path(model_dir).name} {transport}]", file=sys.stderr, flush=True)
    say("starting the policy and the engine")
    cluster = clusters.build(cfg, model_dir, job=f"check-{transport}-{int(time.time())}")
    try:
        prompt_ids = _prompt_ids(model_dir)
        row["perturbed_tensors"] = cluster.policy.execute(perturb, seed, 0.05)[0]
        say(f"perturbed {row['perturbed_tensors']} tensors; refitting")
        t = time.perf_counter()
        cluster.refit()
        row["refit_ms"] = round((time.perf_counter() - t) * 1e3, 1)
        say("refit done; generating")
        rollouts = cluster.generation.generate(prompt_ids, temperature=0.0, max_tokens=max_tokens, n=1)
        engine = [r.response_ids for r in rollouts]
        engine_lp = [r.logprobs for r in rollouts]
        with tempfile.TemporaryDirectory() as tmp:
            cluster.policy.export_hf(tmp, getattr(torch, dtype))
            say("exported the policy's weights; running HF transformers")
            hf_device = device if device == "cpu" else "cuda"
            hf, hf_lp = _hf_reference(tmp, prompt_ids, engine, max_tokens, hf_device, getattr(torch, dtype))
    finally:
        cluster.close()
    same = [a == b for a, b in zip(engine, hf, strict=True)]
    diff = max((abs(a - b) for x, y in zip(engine_lp, hf_lp, strict=True) for a, b in zip(x, y, strict=True)),
               default=0.0)
    row.update(prompts=len(same), greedy_equal=sum(same), max_logprob_diff=float(f"{diff:.3g}"),
               ok=all(same) and diff <= LOGPROB_TOL[dtype] * (10 if device == "cuda" else 1))
    return row


# ------------------------------------------------------------------------------------------ entry point
def run(model_dir: str, args: argparse.Namespace) -> Report:
    """Every check asked for on one checkpoint, each row printed as soon as it is known; raises CheckError /
    UnsupportedModelError if the model cannot be checked."""
    from colocate.engine.support import check_supported

    check_supported(_config(model_dir))
    print(f"\n{model_dir}", flush=True)
    result, n_offered = static_check(model_dir)
    report = Report(ok=result.ok)
    _add_row(report, {"check": "static: names and shapes", "tensors": n_offered, "engine_params": len(result.needs),
                      "ok": result.ok, "detail": result.summary()})
    if args.refit and result.ok:
        transports = ["zmq", "broadcast"] if args.transport == "both" else [args.transport]
        for transport in transports:
            if transport == "broadcast" and args.device == "cuda" and torch.cuda.device_count() < 2:
                _add_row(report, {"check": "refit over broadcast", "ok": None, "detail": "skipped: needs 2 GPUs"})
                continue
            try:
                row = refit_check(model_dir, device=args.device, transport=transport, dtype=args.dtype,
                                  max_tokens=args.max_tokens, timeout_s=args.timeout_s,
                                  verbose=args.verbose)
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
    p.add_argument("--json", help="write the reports here")
    p.add_argument("--verbose", action="store_true", help="show the policy's and the engines' logs")
    args = p.parse_args(argv)
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
