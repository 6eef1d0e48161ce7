"""The run's configuration schema: dataclasses registered with Hydra, so a misspelt key or a wrong type is an
error naming it. `conf/` fills them in per group; `recipes/` override them; `run.py` turns them into the flat
keyword arguments the actors take (no config object crosses into an actor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class PlacementConfig:
    mode: str = "colocated"
    """"colocated": policy and generation share devices; "split": generation on devices of its own."""
    device: str = "cpu"
    """"cpu" or "cuda"."""
    policy_workers: int = 1
    """FSDP2 ranks (one per device)."""
    generation_workers: int = 1
    """vLLM engines (data parallel)."""
    ray_address: str = "auto"
    """"auto": join a running Ray cluster if there is one (a `ray job submit`), else start a local one;
    "local": always start a private local one; or an address."""
    num_cpus: int | None = None
    """CPUs of a locally started cluster (None: all)."""
    strategy: str = "PACK"
    """Ray's strategy for the run's placement group (one bundle per device): "PACK" (as few nodes as
    possible), "SPREAD" (over as many nodes as possible, best effort) or "STRICT_SPREAD" (every bundle on a
    node of its own: fails if the cluster has fewer nodes than bundles)."""


@dataclass
class ModelConfig:
    path: str = "tiny"
    """A local HF checkpoint directory, or "tiny": a small model and tokenizer built locally at start."""
    tiny_seed: int = 0
    allow_unverified: bool = False
    """Run an architecture that `engine.support` does not list as verified for exact refit (the engines still
    refuse any refit their loader would not take exactly)."""


@dataclass
class PolicyConfig:
    backend: str = "fsdp2"
    """"fsdp2" (PyTorch FSDP2, CPU or CUDA) or "megatron" (Megatron-core, CUDA only: `conf/policy/megatron.yaml`)."""
    tensor_parallel_size: int = 1
    """Megatron only: ranks each layer's matrices are split over (must divide heads, MLP width, vocabulary)."""
    pipeline_parallel_size: int = 1
    """Megatron only: pipeline stages the layers are split over; tp * pp must divide `placement.policy_workers`."""
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    micro_batch_size: int = 64
    param_dtype: str = "float32"
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    loss_agg: str = "token_mean"
    offload: bool = False
    """Move optimizer state and parameters off the device while generating (colocated GPU)."""
    seed: int = 0


@dataclass
class GenerationConfig:
    dtype: str = "float32"
    max_model_len: int = 128
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = True
    engine: str = "sync"
    tensor_parallel_size: int = 1
    """Devices (bundles) each engine spans. Colocated: engine w's TP rank r shares bundle w * tp + r with the
    policy rank of that index and takes its refit from it; split: each engine takes tp bundles of its own."""
    sleep: bool = False
    """Put the engine to sleep while the policy trains (GPU colocated)."""
    sleep_level: int = 1
    """1: weights are copied to host memory and back (safe for any refit); 2: weights are dropped, since the
    refit that follows overwrites every one of them (no host copy either way; the engine refuses to generate
    until a refit has completed)."""
    seed: int = 0


@dataclass
class RefitConfig:
    transport: str = "auto"
    """"auto" (from the placement: colocated -> zmq, split -> broadcast), "zmq" or "broadcast"."""
    buffer_size_mb: float | None = None
    """Each of the two buffers, in MiB; null: auto, `auto_fraction` of the sender device's free memory."""
    auto_fraction: float = 0.1
    timeout_s: float = 120.0


@dataclass
class AlgorithmConfig:
    name: str = "grpo"
    steps: int = 20
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 6
    sft_steps: int = 0
    """Supervised warm-up steps on the task's format, so that early rewards are not all zero."""
    sft_lr: float = 1e-3
    val_every: int = 5
    """Score the held-out prompts every k steps (0: never) and always after the last step."""
    checkpoint_every: int = 0
    """0: no checkpoints."""
    resume_from: str | None = None


@dataclass
class DataConfig:
    task: str = "arithmetic"
    jsonl: str | None = None
    """A JSONL file of {"prompt", "answer"} rows instead of the generated task."""
    max_operand: int = 9
    val_fraction: float = 0.2
    seed: int = 0


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    plot: bool = True
    progress: bool = True


@dataclass
class BenchConfig:
    """For `mode: refit_bench` (the buffer-size sweep)."""

    model: str = "tiny"
    repeats: int = 5
    methods: str = "colocate,floor"


@dataclass
class Config:
    mode: str = "train"
    """"train" (the RL loop) or "refit_bench" (one refit benchmark, for sweeps)."""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    refit: RefitConfig = field(default_factory=RefitConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


def register() -> None:
    """The schema, and every recipe in `recipes/` as an option of the `recipe` group (`+recipe=NAME`)."""
    cs = ConfigStore.instance()
    cs.store(name="colocate_schema", node=Config)
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


class ConfigError(ValueError):
    """An impossible or inconsistent configuration, found before any actor starts."""


def check_policy_parallel(pol: PolicyConfig, policy_workers: int) -> None:
    """The backend and its parallel sizes, as far as they can be judged without the model."""
    if pol.backend not in ("fsdp2", "megatron"):
        raise ConfigError(f"policy.backend must be 'fsdp2' or 'megatron', got {pol.backend!r}")
    tp, pp = pol.tensor_parallel_size, pol.pipeline_parallel_size
    if pol.backend == "fsdp2" and (tp, pp) != (1, 1):
        raise ConfigError(f"policy.tensor_parallel_size={tp} and pipeline_parallel_size={pp}: FSDP2 shards "
                          "data-parallel only; use policy=megatron for tensor or pipeline parallelism")
    if tp < 1 or pp < 1 or policy_workers % (tp * pp):
        raise ConfigError(f"placement.policy_workers={policy_workers} is not a multiple of "
                          f"policy.tensor_parallel_size * pipeline_parallel_size = {tp} * {pp}")


def check(cfg: Config, *, cluster_devices: int) -> str:
    """Validate the placement against the cluster; returns the refit transport to use."""
    p = cfg.placement
    if p.mode not in ("colocated", "split"):
        raise ConfigError(f"placement.mode must be 'colocated' or 'split', got {p.mode!r}")
    if p.device not in ("cpu", "cuda"):
        raise ConfigError(f"placement.device must be 'cpu' or 'cuda', got {p.device!r}")
    if p.policy_workers < 1 or p.generation_workers < 1:
        raise ConfigError("placement.policy_workers and placement.generation_workers must be >= 1")
    if p.device == "cuda":
        need = num_bundles(p, cfg.generation.tensor_parallel_size)
        if need > cluster_devices:
            raise ConfigError(f"placement {p.mode!r} needs {need} GPUs (policy_workers={p.policy_workers}, "
                              f"generation_workers={p.generation_workers}); the cluster has {cluster_devices}")
        if p.mode == "split" and cluster_devices < 2:
            raise ConfigError("placement 'split' needs at least 2 GPUs: one cluster device cannot be split")
    check_policy_parallel(cfg.policy, p.policy_workers)
    check_scale(p, cfg.generation)
    if cfg.generation.sleep_level not in (1, 2):
        raise ConfigError(f"generation.sleep_level must be 1 or 2, got {cfg.generation.sleep_level}")
    transport = cfg.refit.transport
    if transport == "auto":
        transport = "zmq" if p.mode == "colocated" else "broadcast"
    if transport not in ("zmq", "broadcast"):
        raise ConfigError(f"refit.transport must be 'auto', 'zmq' or 'broadcast', got {transport!r}")
    if transport == "zmq" and p.mode == "split":
        raise ConfigError("refit.transport 'zmq' (CUDA IPC / shared memory) needs placement 'colocated'")
    return transport


STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")


def num_bundles(p: PlacementConfig, tensor_parallel_size: int) -> int:
    """Bundles (devices) of the run's placement group: colocated, one per device that a policy rank or an
    engine's TP rank uses; split, the policy's and then every engine's tp bundles."""
    engine_devices = p.generation_workers * tensor_parallel_size
    return max(p.policy_workers, engine_devices) if p.mode == "colocated" else p.policy_workers + engine_devices


def check_scale(p: PlacementConfig, g: GenerationConfig) -> None:
    """The placement strategy and the engines' tensor parallelism, as far as the config alone decides:
    before Ray starts (`cluster.build` checks again against the cluster's resources and where bundles
    landed)."""
    if p.strategy not in STRATEGIES:
        raise ConfigError(f"placement.strategy must be one of {', '.join(STRATEGIES)}, got {p.strategy!r}")
    tp = g.tensor_parallel_size
    if tp < 1:
        raise ConfigError(f"generation.tensor_parallel_size must be >= 1, got {tp}")
    if p.mode == "colocated" and p.generation_workers * tp > p.policy_workers:
        # Each engine worker takes its refit over shared memory / CUDA IPC from the policy rank on its device:
        # one without a policy rank beside it would wait for a refit that never comes.
        raise ConfigError(
            f"placement 'colocated': generation_workers * generation.tensor_parallel_size = "
            f"{p.generation_workers} * {tp} engine devices, but only policy_workers={p.policy_workers} policy "
            "ranks to share them; every engine device needs a policy rank")
    if p.mode == "colocated" and tp > 1 and p.strategy != "PACK":
        # An engine's TP workers are processes of its actor's node; the policy ranks sharing their devices
        # are in bundles the strategy may put on other nodes (STRICT_SPREAD always does).
        raise ConfigError(f"placement.strategy={p.strategy} with generation.tensor_parallel_size={tp} "
                          "colocated: an engine's TP ranks must share one node with their policy ranks; use PACK")
