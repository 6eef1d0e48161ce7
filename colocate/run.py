"""Entry point: `python -m colocate.run +recipe=grpo` (also as `ray job submit --working-dir . -- ...`).

Compose the config, check everything the user handed in (`preflight`: a bad input is one line and exit
code 2, before Ray starts), connect to Ray, build the placement and both groups, run, clean up.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from colocate.config import ROOT, Config, check_keys, check_policy_parallel, check_scale, register
from colocate.errors import InputError

register()
log = logging.getLogger("colocate")
INPUT_ERROR_EXIT = 2


def resolve_model(cfg: Config, out_dir: Path) -> str:
    if cfg.model.path != "tiny":
        return cfg.model.path
    from colocate.models.tiny import build_tiny_model

    return str(build_tiny_model(out_dir / "tiny-model", seed=cfg.model.tiny_seed))


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
    check_keys(dcfg)  # `+key=value` gets past Hydra's own check
    cfg: Config = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(dcfg))
    if cfg.mode == "refit_bench":
        from colocate.sweep import run_refit_bench

        return run_refit_bench(cfg, out_dir)

    from colocate.preflight import preflight

    preflight(cfg)  # before Ray, any actor, or the tiny model's build
    check_policy(cfg)
    check_scale(cfg.placement, cfg.generation)
    from colocate import cluster as clusters
    from colocate.train import train

    model_path = resolve_model(cfg, out_dir)
    check_policy(cfg, model_path)  # the model's shapes against the parallel sizes, still before Ray
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
    try:
        main(dcfg)
    except InputError as e:  # the user's input: one line, no traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(INPUT_ERROR_EXIT)


if __name__ == "__main__":
    _hydra_main()
