"""The refit: the policy's weights, in HF names, into every generation engine after each training step.

    plan.py        pure: the manifest (names, dtypes, shapes) and its bucket layout; typed views of a bucket
    schedule.py    pure: the senders' two-buffer schedule, the stats, the callbacks a transport runs with
    errors.py      one root, RefitError, and its named subclasses
    sources.py     pure: what a backend hands a sender besides a tensor (a Fill; resident weights, one-copy)
    slices.py      pure: shard-sliced refit, the part of a weight a TP engine worker keeps (SlicedTensor)
    folded.py      pure: a weight read in place inside a parameter of another layout (FoldedTensor)
    checksum.py    fingerprints and checksums (tests, benchmarks, verify mode)
    sizing.py      how big the two buffers are
    ipc/           colocated transport: CUDA IPC / shared memory + ZMQ, one sender and one receiver per device
    nccl/          split transport: bucketed broadcast over a group of its own (NCCL / gloo)
    policy_side.py the policy worker's `PolicyRefit`: any backend's iterator of HF tensors into a transport
    engine_side.py the vLLM worker extension: one receiver, either transport, into the engine's loader
    driver.py      launches both sides of a refit, awaits them, merges stats, aborts the survivor

Ray appears only in policy_side, engine_side and driver (and `colocate.rendezvous`), never in ipc/ or
nccl/; neither transport imports the other.
"""
