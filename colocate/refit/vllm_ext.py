"""The receiving end of a colocated refit inside a vLLM worker (`worker_extension_cls`).

    llm = make_llm(path, worker_extension_cls="colocate.refit.vllm_ext.ColocateRefitExtension")
    [address] = llm.collective_rpc("colocate_refit_open", args=(job_dir, token, timeout_s))
    ... register `address` under `colocate_device_key()` with the rendezvous; the policy looks it up ...
    llm.collective_rpc("colocate_refit_receive")      # the update task: returns when one refit completed
    llm.reset_prefix_cache()                          # cached KV came from the old weights

Each new manifest is checked against what the engine's loader accepts (`vllm_engine.offer_mismatch`)
before any bucket moves. Each bucket goes through `vllm_engine.load_weights_into_worker` (`model.load_weights`
on GPU, the layerwise reload on CPU where vLLM repacks Linear weights). Method names start with `colocate_`
because the worker has its own `update_weights` and friends, and vLLM refuses an extension whose names clash.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from colocate.engine import vllm_engine
from colocate.refit.broadcast_ext import BroadcastRefitExtension
from colocate.refit.checksum import fingerprint
from colocate.refit.receiver import RefitReceiver


class ColocateRefitExtension(BroadcastRefitExtension):
    """Mixed into the vLLM worker, so `self` is the worker."""

    _colocate_receiver: RefitReceiver | None = None
    _colocate_record: bool = False
    _colocate_seen: dict[str, str]

    def colocate_refit_open(self, job_dir: str, token: str, timeout_s: float = 60.0, record: bool = False) -> str:
        """Bind this worker's receiver in the job's private directory; returns its address."""
        if self._colocate_receiver is not None:
            self._colocate_receiver.close()
        self._colocate_record = record
        self._colocate_seen = {}

        def load(weights: list[tuple[str, torch.Tensor]]) -> None:
            if self._colocate_record:
                self._colocate_seen.update((n, fingerprint(t)) for n, t in weights)
            vllm_engine.load_weights_into_worker(self, weights)

        self._colocate_receiver = RefitReceiver(
            job_dir=job_dir, token=token, load_fn=load, timeout_s=timeout_s,
            begin_fn=lambda: vllm_engine.begin_weight_update(self),
            finish_fn=lambda: vllm_engine.finish_weight_update(self),
            check_fn=lambda meta: vllm_engine.offer_mismatch(self, meta),
        )
        return self._colocate_receiver.address

    def colocate_refit_receive(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Serve one refit (the engine's update task). Raises the protocol's named errors."""
        if self._colocate_receiver is None:
            raise RuntimeError("colocate_refit_open was not called on this worker")
        self._colocate_seen = {}
        with vllm_engine.finished_on_failure(self):  # the caller keeps its weight version on a failure
            return asdict(self._colocate_receiver.receive(timeout_s))

    def colocate_refit_set_record(self, record: bool) -> None:
        """Fingerprint every tensor handed to the engine in the next refits (costs time: not for timing)."""
        self._colocate_record = record

    def colocate_refit_set_load_mode(self, mode: str) -> None:
        """"direct" (GPU fast path where it applies, the default) or "load_weights" (vLLM's own loader)."""
        vllm_engine.set_load_mode(self, mode)

    def colocate_refit_drop_buffers(self) -> None:
        """Close the sender's buffers this receiver keeps open (the sender is done with them)."""
        if self._colocate_receiver is not None:
            self._colocate_receiver.cache.drop()

    def colocate_refit_close(self) -> None:
        if self._colocate_receiver is not None:
            self._colocate_receiver.close()
            self._colocate_receiver = None

    def colocate_device_key(self) -> str:
        """Which device this worker runs on: "cuda:<uuid>", or "cpu:0"."""
        if torch.cuda.is_available():
            return "cuda:" + str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        return "cpu:0"

    def colocate_unloaded_params(self) -> list[str]:
        """Engine parameters the last refit (either transport) left without all their tensors. After
        sleep(level=2) every parameter must be refilled."""
        return vllm_engine.unloaded_params(self)

    def colocate_check_offer(self, offer: list[tuple[str, str, tuple[int, ...]]]) -> dict[str, Any]:
        """Whether a refit of these (name, dtype, shape) tensors fills this engine exactly (`accepts.py`)."""
        check = vllm_engine.check_offer(self, offer)
        return {"ok": check.ok, "summary": check.summary(), "tensors": len(offer), "params": len(check.needs)}

    def colocate_received_fingerprints(self) -> dict[str, str]:
        """What the last refit handed to the engine, per tensor (with `record=True`)."""
        return dict(self._colocate_seen)

    def colocate_param_fingerprints(self) -> dict[str, str]:
        """The engine's parameters as it holds them (vLLM names; on CPU, repacked Linears are empty)."""
        return {n: fingerprint(p.data) for n, p in vllm_engine.engine_named_parameters(self).items()
                if p.numel() > 0}
