"""GPU tests (`@pytest.mark.gpu`) are skipped where CUDA is absent: CI has none; run them on the device."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the device machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _remove_job_dirs():
    """Tests kill engines on purpose (and module fixtures end with `ray.shutdown`), so receivers do not
    always close their sockets: remove the private job directories this session created. The leak checks
    themselves (tests/test_refit_stream.py) look at their own directory before this runs."""
    import glob
    import shutil

    pattern = "/dev/shm/colocate-*"
    before = set(glob.glob(pattern))
    yield
    for path in set(glob.glob(pattern)) - before:
        shutil.rmtree(path, ignore_errors=True)
