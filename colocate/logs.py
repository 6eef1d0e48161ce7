"""What the actors print: colocate's own progress at INFO, vLLM's at WARNING and above.

Ray forwards each actor's stdout and stderr to the driver (`log_to_driver`), each line prefixed with the
actor's class and pid. Start-up takes ~25 s on CPU (model loads, vLLM's engine); without the actors' lines it
is silent, and with vLLM's INFO lines it is a page of configuration dumps per engine. So every actor process
starts with this hook (`cluster.connect`: Ray's `worker_process_setup_hook`) and vLLM with
`VLLM_LOGGING_LEVEL=WARNING` (`cluster.actor_env`; vLLM sets up its own logger when it is imported, from that
variable, so it cannot be turned down here).
"""

from __future__ import annotations

import logging
import sys

FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # as the driver's (Hydra's default)
LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights", logged at every refit through the layerwise
    reload (CPU): the rotary cos/sin cache is computed, never a checkpoint tensor, so no refit sends it and
    vLLM puts the engine's own back, as it should. Any other layer's failure still gets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


def setup_actor_logging() -> None:
    """colocate's loggers print INFO and above to stderr in this process (a Ray worker's: Ray forwards it)."""
    log = logging.getLogger("colocate")
    if any(getattr(h, "_colocate", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler._colocate = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # a root handler someone else adds would print every line twice
    # The logger object outlives vLLM's own logging set-up (which keeps existing loggers), filters and all.
    logging.getLogger(LAYERWISE_LOGGER).addFilter(_RotaryReloadFilter())
