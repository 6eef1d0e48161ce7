"""`await_refit`'s choice of where a failed refit began (pure: no Ray cluster)."""

import ray

from colocate.refit.driver import _origin
from colocate.refit.errors import RefitAbortedError, RefitTimeoutError


def test_a_dead_process_is_the_origin_even_after_a_survivors_error():
    # A SIGKILLed receiver resets the sender's connection at once; Ray reports the death a moment later.
    reset = RefitTimeoutError("sender: gave up waiting for receivers (connection reset by peer)", side="sender")
    death = ray.exceptions.RayActorError()
    assert _origin([("sender", reset), ("receiver", death)]) == ("receiver", death)


def test_otherwise_the_first_failure_that_is_not_an_echo():
    echo = RefitAbortedError("receiver: refit aborted by the driver", side="receiver", echo=True)
    first = RefitTimeoutError("sender: no ack", side="sender")
    assert _origin([("receiver", echo), ("sender", first)]) == ("sender", first)
    later = RefitTimeoutError("receiver: no bucket", side="receiver")
    assert _origin([("sender", first), ("receiver", later)]) == ("sender", first)
