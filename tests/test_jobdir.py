"""The zmq job's private directory on a node other than the driver's: the first sender or receiver there
makes it (mode 0700), and one that others could enter is refused."""

from __future__ import annotations

import os
import stat

import pytest

from colocate.refit.ipc.receiver import RefitReceiver
from colocate.refit.ipc.sender import RefitSender


def _sender(job_dir: str, tmp_path) -> RefitSender:
    # zmq connects lazily: no receiver is needed to make a sender
    return RefitSender(address=f"ipc://{tmp_path}/nobody.sock", token="t" * 32, job_dir=job_dir, device="cpu",
                       buffer_bytes=4096, timeout_s=1.0)


def test_a_sender_or_receiver_on_a_node_without_the_job_dir_makes_it_private(tmp_path):
    for i, make in enumerate([lambda d: _sender(d, tmp_path),
                              lambda d: RefitReceiver(job_dir=d, token="t" * 32, load_fn=lambda w: None)]):
        job_dir = tmp_path / f"colocate-job{i}"  # the driver made its copy on another node
        make(str(job_dir)).close()
        assert job_dir.is_dir() and stat.S_IMODE(job_dir.stat().st_mode) == 0o700


def test_a_job_dir_others_can_enter_is_refused(tmp_path):
    job_dir = tmp_path / "colocate-open"
    job_dir.mkdir()
    os.chmod(job_dir, 0o755)
    with pytest.raises(PermissionError, match="mode 0700"):
        _sender(str(job_dir), tmp_path)
