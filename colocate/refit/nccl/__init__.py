"""The split transport: policy rank 0 broadcasts buckets to every engine worker over a group of its own
(NCCL on GPU, gloo on CPU).

- `frames.py`: the header, the buckets' trailers, the manifest blob and the bucket buffers.
- `group.py`: the group (its own TCP store, token-proven joins, bounded waits, errors raised on every rank).
- `sender.py`: rank 0. `receiver.py`: ranks 1..N, and the lockstep protocol's state machine.

Nothing here knows Ray or the other transport (`tests/test_imports.py`).
"""
