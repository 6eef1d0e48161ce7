"""Named errors of the Megatron-core policy backend. Each is a `ConfigError`: all are found before any actor
starts, from the configuration, the checkpoint's config.json and what this machine has installed."""

from colocate.config import ConfigError


class MegatronUnavailableError(ConfigError):
    """`policy.backend=megatron` on a machine without megatron-core or without CUDA (Megatron-core's model code
    needs CUDA). `reason` is the one-line cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"policy.backend=megatron cannot run here: {reason}")
        self.reason = reason


class MegatronModelError(ConfigError):
    """A checkpoint the HF <-> Megatron conversion does not cover (an architecture or option outside the dense
    Llama / Qwen2 / Qwen3 family). `field` names the config.json key that decided it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class MegatronLayoutError(ConfigError):
    """Tensor / pipeline parallel sizes that the model's shapes or the number of policy workers do not divide.
    `field` names the quantity that does not divide."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
