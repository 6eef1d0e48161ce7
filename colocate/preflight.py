"""Checks of everything a user hands a run, before anything starts (no Ray, no actor, no torch import):
the config's values, the data file(s), the reward function, the model directory, the checkpoint to resume
from. Each failure is one `InputError` naming the key, file or row; `run.py` prints its one line and exits
with code 2.

The model check is the cheap half of `python -m colocate.check`: the directory, its config.json, a tokenizer,
an architecture the refit is verified exact for (`engine.support`). The dry run of the engine's loader over
the policy's tensors needs both models built (seconds to minutes): each engine runs it when the cluster is
built, before the first step.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from colocate.config import Config, check_values
from colocate.data.build import check_rows
from colocate.engine.support import check_supported
from colocate.errors import InputError
from colocate.models.errors import UnsupportedModelError
from colocate.resume import check as check_resume
from colocate.rewards.spec import load_reward

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class ModelDirError(InputError):
    """`model.path` is not a checkpoint directory a run can use."""


def check_model_dir(path: str, *, allow_unverified: bool, chat: str) -> None:
    d = Path(path)
    if not d.is_dir():
        raise ModelDirError(f"model.path: {path} is not a directory (a local HF checkpoint directory, or 'tiny'; "
                            "models are never downloaded)", subject=path)
    try:
        config = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise ModelDirError(f"model.path: {path} has no config.json", subject=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"model.path: {path}/config.json is not JSON ({e})", subject=path) from None
    try:
        check_supported(SimpleNamespace(architectures=config.get("architectures")), allow_unverified=allow_unverified)
    except UnsupportedModelError as e:
        raise ModelDirError(f"model.path: {path}: {e}", subject=path) from None
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise ModelDirError(f"model.path: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})",
                            subject=path)
    if str(chat).lower() == "true" and not _has_chat_template(d):
        raise ModelDirError(f"data.chat=true, but the tokenizer in {path} has no chat template", subject="data.chat")


def _has_chat_template(d: Path) -> bool:
    if any((d / f).is_file() for f in CHAT_TEMPLATE_FILES):
        return True
    try:
        return bool(json.loads((d / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, json.JSONDecodeError):
        return False


def preflight(cfg: Config) -> None:
    """Raise the first `InputError` among the config's values, the data, the reward function, the model and
    the checkpoint to resume from."""
    check_values(cfg)
    check_rows(cfg.data)
    load_reward(cfg.reward.fn)
    if cfg.model.path != "tiny":
        check_model_dir(cfg.model.path, allow_unverified=cfg.model.allow_unverified, chat=cfg.data.chat)
    if cfg.algorithm.resume_from is not None:
        check_resume(cfg.algorithm.resume_from, steps=cfg.algorithm.steps, backend=cfg.policy.backend)
