"""Training and held-out problems from the `data` config: a file's rows, or the arithmetic generator.

`check_rows` is what `preflight` runs before anything starts (no tokenizer needed); `build_problems` is what
the training driver runs once the model's tokenizer is there.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from colocate.config import DataConfig
from colocate.data.problem import DataError, Problem
from colocate.data.read import read_rows
from colocate.data.render import prompt_content, render, use_chat

log = logging.getLogger(__name__)


def _checked(path: str, d: DataConfig, what: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows that hold the prompt (or the template's fields) and a non-null answer, else the first bad one."""
    rows, where = read_rows(path, what)
    if not rows:
        raise DataError(f"{what}: {path} has no rows", subject=path)
    for row, at in zip(rows, where, strict=True):
        keys = [d.answer_key] if d.template is not None else [d.prompt_key, d.answer_key]
        for key in keys:
            if row.get(key) is None:
                raise DataError(f"{what}: {path} {at} has no {key!r} (its fields: {sorted(row)}); "
                                f"see data.prompt_key / data.answer_key", subject=f"{path} {at}")
        prompt_content(row, prompt_key=d.prompt_key, template=d.template, where=f"{path} {at}")
    return rows, where


def _split(d: DataConfig) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
    """(index, row) pairs for training and validation."""
    assert d.path is not None
    rows, _ = _checked(d.path, d, "data.path")
    indexed = list(enumerate(rows))
    if d.val_path is not None:
        val_rows, _ = _checked(d.val_path, d, "data.val_path")
        return indexed, list(enumerate(val_rows))
    n_val = max(1, int(len(rows) * d.val_fraction))
    if len(rows) - n_val < 1:
        raise DataError(f"data.path: {d.path} has {len(rows)} row(s): too few to hold out data.val_fraction="
                        f"{d.val_fraction} and train on the rest (need 2 or more, or a data.val_path)",
                        subject=d.path)
    # A seeded shuffle before the cut: files are often sorted (by source, by difficulty).
    random.Random(d.seed).shuffle(indexed)
    return indexed[n_val:], indexed[:n_val]


def check_rows(d: DataConfig) -> tuple[int, int]:
    """Read and check the data file(s) as a run would; (training rows, held-out rows)."""
    if d.path is None:
        if d.val_path is not None:
            raise DataError("data.val_path is set without a data.path", subject="data.val_path")
        return 0, 0
    train, val = _split(d)
    return len(train), len(val)


def build_problems(d: DataConfig, tokenizer: Any) -> tuple[list[Problem], list[Problem]]:
    """(train, val) problems, prompts rendered; the first one is logged as the model will see it."""
    if d.path is None:
        from colocate.tasks.arithmetic import split_problems

        train, val = split_problems(d.max_operand, d.val_fraction, d.seed)
        chat = use_chat(d.chat, tokenizer, from_file=False)
        if chat or d.system_prompt:
            train, val = ([Problem(render(p.prompt, system_prompt=d.system_prompt, chat=chat, tokenizer=tokenizer),
                                   p.answer, p.row, p.index) for p in ps] for ps in (train, val))
    else:
        chat = use_chat(d.chat, tokenizer, from_file=True)

        def problem(index: int, row: dict) -> Problem:
            content = prompt_content(row, prompt_key=d.prompt_key, template=d.template, where=f"row {index}")
            text = render(content, system_prompt=d.system_prompt, chat=chat, tokenizer=tokenizer)
            return Problem(text, str(row[d.answer_key]), row, index)

        train_rows, val_rows = _split(d)
        train, val = [problem(i, r) for i, r in train_rows], [problem(i, r) for i, r in val_rows]
    log.info("data: %d training and %d held-out prompts, chat template %s; the first prompt as rendered:\n%s",
             len(train), len(val), "applied" if chat else "not applied", train[0].prompt)
    return train, val
