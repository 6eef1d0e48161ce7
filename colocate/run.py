"""Entry point: `python -m colocate.run +recipe=grpo` (also as `ray job submit --working-dir . -- ...`).

Compose the config, connect to Ray, build the placement and both groups, run, clean up.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from colocate.config import ROOT, Config, check_policy_parallel, check_scale, register

register()
log = logging.getLogger("colocate")


def resolve_model(cfg: Config, out_dir: Path) -> str:
    if cfg.model.path != "tiny":
        return cfg.model.path
    from colocate.models.tiny import build_tiny_model

    return str(build_tiny_model(out_dir / "tiny-model", seed=cfg.model.tiny_seed))


def check_model(model_path: str, *, allow_unverified: bool) -> None:
    """A local checkpoint of an architecture the refit is verified exact for (`engine.support`)."""
    from transformers import AutoConfig

    from colocate.engine.support import check_supported

    check_supported(AutoConfig.from_pretrained(model_path), allow_unverified=allow_unverified)


def check_policy(cfg: Config, model_path: str | None = None) -> None:
    """The policy backend can run here, and (once the model is known) on this model: before Ray starts.
    Without `model_path` only what the config alone decides; a missing megatron-core or CUDA fails in ~1 s."""
    pol = cfg.policy
    check_policy_parallel(pol, cfg.placement.policy_workers)
    if pol.backend != "megatron":
        return
    from colocate.policy.megatron import preflight

    if model_path is None:
        preflight.check_available(cfg.placement.device)
    else:
        preflight.check_model_layout(model_path, tp_size=pol.tensor_parallel_size,
                                     pp_size=pol.pipeline_parallel_size, world_size=cfg.placement.policy_workers)


def main(dcfg: DictConfig) -> dict:
    cfg: Config = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(dcfg))
    if cfg.mode == "refit_bench":
        from colocate.sweep import run_refit_bench

        return run_refit_bench(cfg, out_dir)

    check_policy(cfg)  # before anything is built
    check_scale(cfg.placement, cfg.generation)
    from colocate import cluster as clusters
    from colocate.train import train

    model_path = resolve_model(cfg, out_dir)
    check_model(model_path, allow_unverified=cfg.model.allow_unverified)  # before Ray or any actor starts
    check_policy(cfg, model_path)
    clusters.connect(cfg.placement.ray_address, cfg.placement.num_cpus)
    cluster = clusters.build(cfg, model_path, job=out_dir.name)
    try:
        summary = train(cfg, cluster, out_dir)
    finally:
        cluster.close()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("summary: %s", json.dumps(summary))
    print(json.dumps(summary))
    return summary


@hydra.main(config_path=str(ROOT / "conf"), config_name="config", version_base=None)
def _hydra_main(dcfg: DictConfig) -> None:
    main(dcfg)


if __name__ == "__main__":
    _hydra_main()
