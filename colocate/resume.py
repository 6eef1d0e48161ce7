"""Checkpoints a run can resume from (`algorithm.checkpoint_every`, `algorithm.resume_from`).

A checkpoint is the directory `<output_dir>/checkpoints/step_NNNNN`: the policy's part (every rank's shards
of the weights, AdamW state and LR schedule, and each rank's RNG states: `policy/checkpoint.py`) and then
the driver's, `trainer_state.json`: the step, the prompt sampler's generator (the data order) and the
driver's RNG states. The driver's file is written last, so its presence marks a complete checkpoint.

A run resumed from step N loads all of it, refits the engines (they must sample from the loaded weights)
and runs steps N+1 .. `algorithm.steps`; the warm-up and the evaluation before RL are not run again. The
engines keep no state to restore: every request of step s is seeded from s (`GRPO.step`), and a held-out
evaluation from fixed seeds, so what they sample depends only on the weights and the step.

This module imports no torch at the top: the preflight reads a checkpoint's step before anything starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from colocate.errors import InputError

STATE_FILE = "trainer_state.json"
KEY = "algorithm.resume_from"


class ResumeError(InputError):
    """`algorithm.resume_from` is not a checkpoint this run can resume from."""


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:05d}"


def save(path: Path, *, policy: Any, step: int, sampler: Any, backend: str) -> None:
    """The policy's checkpoint (a collective of its ranks), then the driver's state beside it."""
    from colocate.rng import generator_state, rng_state

    policy.save_checkpoint(str(path))
    state = {"step": step, "policy_backend": backend, "sampler": generator_state(sampler), "rng": rng_state()}
    (path / STATE_FILE).write_text(json.dumps(state))


def load(path: str, *, policy: Any, sampler: Any) -> int:
    """Load the policy's checkpoint and the driver's state in place; returns the step it was written at."""
    from colocate.rng import set_generator_state, set_rng_state

    state = read_state(path)
    policy.load_checkpoint(str(Path(path).resolve()))  # the ranks may not share the driver's working directory
    set_generator_state(sampler, state["sampler"])
    set_rng_state(state["rng"])
    return int(state["step"])


def read_state(path: str) -> dict[str, Any]:
    """The driver's state of the checkpoint at `path`; `ResumeError` (one line, naming the key) if there is
    none to read."""
    d = Path(path)
    if not path or not d.is_dir():
        raise ResumeError(f"{KEY}: {path!r} is not a directory (a checkpoint of algorithm.checkpoint_every: "
                          "<output_dir>/checkpoints/step_NNNNN)", subject=KEY)
    try:
        state = json.loads((d / STATE_FILE).read_text())
    except FileNotFoundError:
        raise ResumeError(f"{KEY}: {path} has no {STATE_FILE} (not a checkpoint of algorithm.checkpoint_every, "
                          "or one whose writing did not finish)", subject=KEY) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResumeError(f"{KEY}: {path}/{STATE_FILE} is not JSON ({e})", subject=KEY) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ResumeError(f"{KEY}: {path}/{STATE_FILE} has no step", subject=KEY)
    return state


def check(path: str, *, steps: int, backend: str) -> None:
    """Before anything starts: `path` is a complete checkpoint of this policy backend, and steps remain."""
    state = read_state(path)
    saved = state.get("policy_backend")
    if saved != backend:
        raise ResumeError(f"{KEY}: {path} was written by the {saved} policy backend; this run's policy.backend "
                          f"is {backend}", subject=KEY)
    if state["step"] >= steps:
        raise ResumeError(f"{KEY}: {path} is at step {state['step']}; algorithm.steps={steps} leaves no step to "
                          "run (raise algorithm.steps to continue the run)", subject=KEY)
