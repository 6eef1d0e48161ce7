"""How big the two ping-pong buffers are: bytes from config, or `auto`, a fraction of the free memory of the
sender's device (NVML on GPU, available RAM on CPU) split across the two buffers.

The cap keeps `auto` from taking memory the refit cannot use: past ~2 GiB a bucket stops paying for itself
(docs/benchmarks: 1 GiB -> 22.7 ms, 2 GiB -> 20.0 ms for Llama-3-8B on an H200).
"""

from __future__ import annotations

import psutil
import torch

MIN_BYTES = 1 << 20
MAX_AUTO_BYTES = 2 << 30


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                if uuid.replace("GPU-", "") in str(pynvml.nvmlDeviceGetUUID(h)):
                    return int(pynvml.nvmlDeviceGetMemoryInfo(h).free)
        except Exception:  # NVML missing or unusable: the CUDA runtime knows this device's free memory too
            pass
        return int(torch.cuda.mem_get_info(index)[0])
    return int(psutil.virtual_memory().available)


def buffer_bytes(size_mb: float | None, device: torch.device, *, auto_fraction: float = 0.1) -> int:
    """Bytes for each of the two buffers. `size_mb=None` means auto."""
    if size_mb is not None:
        if size_mb <= 0:
            raise ValueError(f"buffer size must be positive, got {size_mb} MiB")
        return max(int(size_mb * (1 << 20)), 256)
    if not 0 < auto_fraction <= 0.5:
        raise ValueError(f"auto_fraction must be in (0, 0.5], got {auto_fraction}")
    each = int(free_bytes(device) * auto_fraction / 2)
    return max(MIN_BYTES, min(each, MAX_AUTO_BYTES))
