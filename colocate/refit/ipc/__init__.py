"""The colocated transport: the policy rank and the engine worker on one device, buffers shared in place.

- `wire.py`: the messages (msgspec JSON, never pickle) and their framing with the job's token.
- `buffers.py`: the two ping-pong buffers as CUDA IPC handles (GPU) or files in the job's tmpfs dir (CPU).
- `jobdir.py`: the job's private (0700) directory and token.
- `sender.py`: the policy's end. `receiver.py`: the engine's end, and the protocol's state machine.

Nothing here knows Ray or the other transport (`tests/test_imports.py`).
"""
