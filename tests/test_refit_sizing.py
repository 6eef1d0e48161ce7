import psutil
import pytest
import torch

from colocate.refit.sizing import MAX_AUTO_BYTES, MIN_BYTES, buffer_bytes


def test_explicit_size():
    assert buffer_bytes(64, torch.device("cpu")) == 64 << 20
    with pytest.raises(ValueError, match="positive"):
        buffer_bytes(0, torch.device("cpu"))


def test_auto_is_a_fraction_of_free_memory_split_in_two(monkeypatch):
    class VM:
        available = 8 << 30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM)
    assert buffer_bytes(None, torch.device("cpu"), auto_fraction=0.1) == int((8 << 30) * 0.1 / 2)
    VM.available = 1 << 40
    assert buffer_bytes(None, torch.device("cpu")) == MAX_AUTO_BYTES
    VM.available = 1 << 10
    assert buffer_bytes(None, torch.device("cpu")) == MIN_BYTES
    with pytest.raises(ValueError, match="auto_fraction"):
        buffer_bytes(None, torch.device("cpu"), auto_fraction=0.9)
