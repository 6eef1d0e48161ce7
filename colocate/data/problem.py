"""One prompt with its gold answer, and the row it came from (a user's reward function gets the row)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from colocate.errors import InputError


@dataclass(frozen=True)
class Problem:
    prompt: str
    """The text the policy is prompted with, chat template applied where it is."""
    answer: str
    row: dict[str, Any] = field(default_factory=dict)
    """The data row, every field (for `module:function` rewards)."""
    index: int = 0
    """The row's index in its file (errors name it)."""


class DataError(InputError):
    """The data file or its rows: `subject` is the file, or the file and the line or row at fault."""
