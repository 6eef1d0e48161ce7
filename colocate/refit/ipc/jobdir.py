"""The per-job private directory that holds a job's sockets and shared-memory segments, and its token.

Local sockets and segments are files; putting them in one 0700 directory owned by the job's user keeps other
users from connecting or mapping them. Names inside it are random (`secrets.token_hex`), and every frame on
the wire also carries the job's token, so a process of the same user that is not part of the job is rejected.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path


def new_token() -> str:
    return secrets.token_hex(16)


def _shm_root() -> str:
    # tmpfs: segments are memory, not disk. Fall back to the temp dir where /dev/shm is absent.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def new_job_dir() -> str:
    """Create a fresh private directory for one job (mode 0700, unguessable name)."""
    return tempfile.mkdtemp(prefix="colocate-", dir=_shm_root())


def ensure_private_dir(path: str) -> Path:
    """Create `path` with mode 0700 if missing (another node of the job), and refuse one others can enter."""
    p = Path(path)
    p.mkdir(mode=0o700, parents=False, exist_ok=True)
    st = p.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"{path} must be owned by uid {os.getuid()} with mode 0700")
    return p


def random_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"
