"""Rows of a local data file as dicts, every failure one `DataError` naming the file and the line or row.

JSONL is parsed here, line by line, so that a bad line is named; `.json` (an array or JSON lines), Parquet,
CSV and `save_to_disk` folders are read by HF `datasets`, never from the hub (offline mode is forced).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from colocate.data.problem import DataError

FORMATS = ".jsonl, .json, .parquet, .csv or a datasets save_to_disk folder"


def read_rows(path: str, what: str = "data.path") -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, where): `where[i]` says where row i is in the file ("line 7" for JSONL, else "row 6")."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what}: {path} does not exist", subject=path)
    if p.is_file() and p.suffix == ".jsonl":
        return _read_jsonl(p, what)
    rows = _read_with_datasets(p, what)
    return rows, [f"row {i}" for i in range(len(rows))]


def _read_jsonl(p: Path, what: str) -> tuple[list[dict[str, Any]], list[str]]:
    rows, where = [], []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{what}: {p} line {n} is not JSON ({e.msg} at column {e.colno})",
                                subject=f"{p}:{n}") from None
            if not isinstance(row, dict):
                raise DataError(f"{what}: {p} line {n} is a JSON {type(row).__name__}, not an object",
                                subject=f"{p}:{n}")
            rows.append(row)
            where.append(f"line {n}")
    return rows, where


def _read_with_datasets(p: Path, what: str) -> list[dict[str, Any]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read before `datasets` is first imported
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    suffix = p.suffix.lower() if p.is_file() else ""
    readers = {".json": datasets.Dataset.from_json, ".parquet": datasets.Dataset.from_parquet,
               ".csv": datasets.Dataset.from_csv}
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds and len(ds) != 1:
                    raise DataError(f"{what}: {p} holds splits {sorted(ds)} and none is 'train'; point at one "
                                    "split's folder", subject=str(p))
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        elif suffix in readers:
            ds = readers[suffix](str(p))
        else:
            raise DataError(f"{what}: {p}: unknown format {p.suffix or '(no suffix)'!r}; expected {FORMATS}",
                            subject=str(p))
    except DataError:
        raise
    except Exception as e:
        cause = e.__cause__ or e  # datasets wraps the reader's own error (pyarrow's) in DatasetGenerationError
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise DataError(f"{what}: {p} does not parse as {suffix or 'a datasets folder'}: "
                        f"{type(cause).__name__}: {first}", subject=str(p)) from None
    return ds.to_list()
