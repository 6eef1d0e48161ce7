"""The user's input, refused: one class that `run.py` turns into a one-line message and exit code 2."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input (a config value, the model directory, the data file, the reward function) found before
    anything starts. `subject` names what is at fault: a config key, a file, a file's line or row."""

    def __init__(self, message: str, subject: str | None = None) -> None:
        super().__init__(message)
        self.subject = subject
