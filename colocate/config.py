"""The run's configuration schema: dataclasses registered with Hydra, so a misspelt key or a wrong type is an
error naming it. `conf/` fills them in per group; `recipes/` override them; `run.py` turns them into the flat
keyword arguments the actors take (no config object crosses into an actor).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from colocate.errors import InputError

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
    one_copy: bool = True
    """Where the policy's weights already sit whole on an engine's device (one FSDP2 rank on a GPU, with
    policy.offload=false), the engine reads them in place: one copy, no buffers."""
    shard_slice: bool = True
    """Colocated with tensor-parallel engines: each policy rank sends its engine worker only the slice of each
    weight that worker keeps (its TP shard, as the engine's own loader says), 1/tp of those bytes."""
    verify_every: int = 0
    """Every k steps (0: never), after the step's refit: each engine's greedy tokens on `verify_prompts`
    held-out prompts against HF transformers on the policy's weights (exported to HF, run on policy rank 0's
    device); a difference beyond rounding stops the run with RefitVerifyError (`colocate/verify.py`)."""
    verify_prompts: int = 4
    verify_max_tokens: int = 16


@dataclass
class AlgorithmConfig:
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
    """Write a checkpoint every k steps to `<output_dir>/checkpoints/step_NNNNN` (0: none)."""
    resume_from: str | None = None
    """A checkpoint directory of `checkpoint_every` (`.../checkpoints/step_NNNNN`): load its policy, optimizer,
    LR schedule, step, data order and RNG states, refit the engines, and run the steps after it up to `steps`
    (no warm-up); null: start afresh."""
    eval_samples: int = 0
    """k > 1: every held-out evaluation also samples k completions per prompt at `temperature` / `top_p` and
    logs `val_pass@k` beside the greedy `val_pass@1`; 0 or 1: greedy only."""


@dataclass
class DataConfig:
    path: str | None = None
    """A local JSONL, Parquet or CSV file, or a folder written by `datasets`' `save_to_disk`; null: the
    built-in arithmetic generator (`max_operand`)."""
    prompt_key: str = "prompt"
    """The row's field that holds the prompt (a text, or a list of chat messages {"role", "content"})."""
    answer_key: str = "answer"
    """The row's field that holds the gold answer the reward compares against."""
    template: str | None = None
    """A format string over the row's fields, e.g. "{question}\\nPut the final answer in \\boxed{{}}."; it
    replaces `prompt_key` as the prompt."""
    system_prompt: str | None = None
    """A system message before the prompt (with the chat template) or a line before it (without)."""
    chat: str = "auto"
    """"auto": a data file's prompts go through the tokenizer's chat template when it has one (the arithmetic
    generator's prompts stay raw: they are completions in the tiny corpus's format); "true" or "false"."""
    val_path: str | None = None
    """Held-out rows from a file of their own (same keys); null: the first `val_fraction` of the rows."""
    val_fraction: float = 0.2
    max_operand: int = 9
    """The arithmetic generator: operands 0..max_operand."""
    seed: int = 0


@dataclass
class RewardConfig:
    fn: str = "exact_number"
    """A built-in ("exact_number": the first number in the completion equals the answer; "exact_match": the
    stripped completion equals it; "math": math-verify's comparison, see `colocate.rewards.math`) or
    "module:function" taking (completion: str, row: dict) and returning a float."""
    workers: int = 2
    """Processes scoring completions in parallel; 0: in the driver, unbounded in time (for debugging)."""
    timeout_s: float = 10.0
    """A call that takes longer is killed and scores 0 (a pathological expression must not stall a run)."""


@dataclass
class LoggingConfig:
    output_dir: str | None = None
    """An absolute directory the run writes everything into (null: Hydra's `outputs/<date>/<time>/` under the
    working directory, which `ray job submit` makes a private copy of)."""
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
    reward: RewardConfig = field(default_factory=RewardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


def register() -> None:
    """The schema, and every recipe in `recipes/` as an option of the `recipe` group (`+recipe=NAME`)."""
    cs = ConfigStore.instance()
    # `hydra.run.dir` is `logging.output_dir` unless that is null (oc.select takes its default only for a
    # missing key, not a null one).
    if not OmegaConf.has_resolver("or_else"):
        OmegaConf.register_new_resolver("or_else", lambda value, default: default if value is None else value)
    cs.store(name="colocate_schema", node=Config)
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


class ConfigError(InputError):
    """An impossible or inconsistent configuration, found before any actor starts; `subject` names the config
    key at fault (None where it is a combination)."""


def unknown_keys(dcfg: DictConfig, schema: type = Config, prefix: str = "") -> list[str]:
    """Keys of the composed config that the schema does not have.

    Hydra's `+key=value` adds a key even to a struct config (that is what `+` is for), and `OmegaConf.to_object`
    then carries it along unread; so the composed config is compared with the dataclasses, field by field.
    """
    names = {f.name: f.type for f in fields(schema)}
    hints = typing.get_type_hints(schema)
    found = []
    for key in dcfg:
        if not prefix and key == "hydra":  # present where the caller composed with return_hydra_config
            continue
        if key not in names:
            found.append(f"{prefix}{key}")
        elif is_dataclass(hints[key]) and isinstance(dcfg[key], DictConfig):
            found += unknown_keys(dcfg[key], hints[key], f"{prefix}{key}.")
    return found


def check_keys(dcfg: DictConfig) -> None:
    unknown = unknown_keys(dcfg)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}"
                          + (f" (and {len(unknown) - 1} more: {unknown[1:]})" if len(unknown) > 1 else "")
                          + "; the schema is colocate/config.py", subject=unknown[0])


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}", subject=key)


DTYPES = ("float32", "bfloat16", "float16")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean")  # policy.grpo_loss.LOSS_AGGS, without importing torch here


def check_values(cfg: Config) -> None:
    """Every value the schema's types cannot rule out, before anything starts (no Ray, no cluster)."""
    p, g, r, a, pol, d = cfg.placement, cfg.generation, cfg.refit, cfg.algorithm, cfg.policy, cfg.data
    _require(cfg.mode in ("train", "refit_bench"), "mode", f"must be 'train' or 'refit_bench', got {cfg.mode!r}")
    _require(p.mode in ("colocated", "split"), "placement.mode", f"must be 'colocated' or 'split', got {p.mode!r}")
    _require(p.device in ("cpu", "cuda"), "placement.device", f"must be 'cpu' or 'cuda', got {p.device!r}")
    _require(p.policy_workers >= 1, "placement.policy_workers", f"must be >= 1, got {p.policy_workers}")
    _require(p.generation_workers >= 1, "placement.generation_workers", f"must be >= 1, got {p.generation_workers}")
    _require(p.num_cpus is None or p.num_cpus >= 1, "placement.num_cpus", f"must be >= 1, got {p.num_cpus}")
    _require(pol.lr > 0, "policy.lr", f"must be > 0, got {pol.lr}")
    _require(pol.micro_batch_size >= 1, "policy.micro_batch_size", f"must be >= 1, got {pol.micro_batch_size}")
    _require(pol.param_dtype in DTYPES, "policy.param_dtype", f"must be one of {DTYPES}, got {pol.param_dtype!r}")
    _require(pol.kl_coef >= 0, "policy.kl_coef", f"must be >= 0, got {pol.kl_coef}")
    _require(pol.clip_low >= 0 and pol.clip_high >= 0, "policy.clip_low",
             f"clip_low and clip_high must be >= 0, got {pol.clip_low}, {pol.clip_high}")
    _require(pol.loss_agg in LOSS_AGGS, "policy.loss_agg", f"must be one of {LOSS_AGGS}, got {pol.loss_agg!r}")
    _require(g.dtype in DTYPES, "generation.dtype", f"must be one of {DTYPES}, got {g.dtype!r}")
    _require(g.engine in ("sync", "async"), "generation.engine", f"must be 'sync' or 'async', got {g.engine!r}")
    _require(g.max_model_len >= 2, "generation.max_model_len", f"must be >= 2, got {g.max_model_len}")
    _require(0 < g.gpu_memory_utilization <= 1, "generation.gpu_memory_utilization",
             f"must be in (0, 1], got {g.gpu_memory_utilization}")
    _require(g.sleep_level in (1, 2), "generation.sleep_level", f"must be 1 or 2, got {g.sleep_level}")
    _require(r.transport in ("auto", "zmq", "broadcast"), "refit.transport",
             f"must be 'auto', 'zmq' or 'broadcast', got {r.transport!r}")
    _require(r.buffer_size_mb is None or r.buffer_size_mb > 0, "refit.buffer_size_mb",
             f"must be > 0 (or null: auto), got {r.buffer_size_mb}")
    _require(0 < r.auto_fraction <= 1, "refit.auto_fraction", f"must be in (0, 1], got {r.auto_fraction}")
    _require(r.timeout_s > 0, "refit.timeout_s", f"must be > 0, got {r.timeout_s}")
    _require(r.verify_every >= 0, "refit.verify_every", f"must be >= 0, got {r.verify_every}")
    _require(r.verify_prompts >= 1 and r.verify_max_tokens >= 1, "refit.verify_prompts",
             f"verify_prompts and verify_max_tokens must be >= 1, got {r.verify_prompts}, {r.verify_max_tokens}")
    _require(a.steps >= 0, "algorithm.steps", f"must be >= 0, got {a.steps}")
    _require(a.prompts_per_step >= 1, "algorithm.prompts_per_step", f"must be >= 1, got {a.prompts_per_step}")
    _require(a.samples_per_prompt >= 1, "algorithm.samples_per_prompt", f"must be >= 1, got {a.samples_per_prompt}")
    _require(a.max_new_tokens >= 1, "algorithm.max_new_tokens", f"must be >= 1, got {a.max_new_tokens}")
    _require(a.max_new_tokens < g.max_model_len, "algorithm.max_new_tokens",
             f"{a.max_new_tokens} leaves no room for a prompt in generation.max_model_len={g.max_model_len}")
    _require(a.temperature >= 0, "algorithm.temperature", f"must be >= 0, got {a.temperature}")
    _require(0 < a.top_p <= 1, "algorithm.top_p", f"must be in (0, 1], got {a.top_p}")
    _require(a.sft_steps >= 0 and a.val_every >= 0 and a.checkpoint_every >= 0, "algorithm.sft_steps",
             "sft_steps, val_every and checkpoint_every must be >= 0")
    _require(a.eval_samples >= 0, "algorithm.eval_samples", f"must be >= 0, got {a.eval_samples}")
    _require(a.eval_samples <= 1 or a.temperature > 0, "algorithm.eval_samples",
             f"pass@{a.eval_samples} samples at algorithm.temperature, which is 0 (greedy: one completion per prompt)")
    _require(str(d.chat).lower() in ("auto", "true", "false"), "data.chat",
             f"must be auto, true or false, got {d.chat!r}")
    _require(0 < d.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    _require(d.max_operand >= 1, "data.max_operand", f"must be >= 1, got {d.max_operand}")
    _require(cfg.reward.workers >= 0, "reward.workers", f"must be >= 0, got {cfg.reward.workers}")
    _require(cfg.reward.timeout_s > 0, "reward.timeout_s", f"must be > 0, got {cfg.reward.timeout_s}")
    out = cfg.logging.output_dir
    _require(out is None or Path(out).is_absolute(), "logging.output_dir",
             f"must be an absolute path (a `ray job submit` runs in a private copy of the working directory), "
             f"got {out!r}")
    transport = r.transport if r.transport != "auto" else ("zmq" if p.mode == "colocated" else "broadcast")
    _require(not (transport == "zmq" and p.mode == "split"), "refit.transport",
             "'zmq' (CUDA IPC / shared memory) needs placement 'colocated'")


def check_policy_parallel(pol: PolicyConfig, policy_workers: int) -> None:
    """The backend and its parallel sizes, as far as they can be judged without the model."""
    if pol.backend not in ("fsdp2", "megatron"):
        raise ConfigError(f"policy.backend must be 'fsdp2' or 'megatron', got {pol.backend!r}")
    tp, pp = pol.tensor_parallel_size, pol.pipeline_parallel_size
    if pol.backend == "fsdp2" and (tp, pp) != (1, 1):
        raise ConfigError(f"policy.tensor_parallel_size={tp} and pipeline_parallel_size={pp}: FSDP2 shards "
                          "data-parallel only; use policy=megatron for tensor or pipeline parallelism")
    if pol.backend == "megatron" and pol.kl_coef > 0:
        raise ConfigError("policy.kl_coef > 0 needs a reference policy, which the Megatron backend does not have "
                          "yet (FSDP2 does)", subject="policy.kl_coef")
    if tp < 1 or pp < 1 or policy_workers % (tp * pp):
        raise ConfigError(f"placement.policy_workers={policy_workers} is not a multiple of "
                          f"policy.tensor_parallel_size * pipeline_parallel_size = {tp} * {pp}")


def check(cfg: Config, *, cluster_devices: int) -> str:
    """Validate the configuration and the placement against the cluster; returns the refit transport to use."""
    check_values(cfg)
    p = cfg.placement
    check_policy_parallel(cfg.policy, p.policy_workers)
    check_scale(p, cfg.generation)
    if p.device == "cuda":
        need = num_bundles(p, cfg.generation.tensor_parallel_size)
        if need > cluster_devices:
            raise ConfigError(f"placement {p.mode!r} needs {need} GPUs (policy_workers={p.policy_workers}, "
                              f"generation_workers={p.generation_workers}); the cluster has {cluster_devices}")
        if p.mode == "split" and cluster_devices < 2:
            raise ConfigError("placement 'split' needs at least 2 GPUs: one cluster device cannot be split")
    if cfg.refit.transport != "auto":
        return cfg.refit.transport  # its value and its fit with the placement: `check_values`
    return "zmq" if p.mode == "colocated" else "broadcast"


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
