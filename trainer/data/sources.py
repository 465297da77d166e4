"""Where rows come from: local files, globs and ``save_to_disk`` directories, read whole or streamed.

Nothing is ever downloaded: a name that is not a local path is refused, with what to do instead.
jsonl and json rows are kept as their JSON text (decoded per row in formats.py), so a mistyped field
is a bad row named by file and row rather than a failure of the whole file, and a jsonl row number is
its line number.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from trainer.config import DataSource
from trainer.data.formats import JSON_COLUMN
from trainer.errors import DataError

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")


@dataclass(frozen=True)
class SourceFile:
    """One readable file (or saved data set directory) and how to read it."""

    path: str
    kind: str  # a value of SUFFIXES, or "saved" for a save_to_disk directory
    split: str = "train"


@dataclass(frozen=True)
class Source:
    """A configured source: its files in sorted order, read one after the other, and its weight."""

    name: str
    files: tuple[SourceFile, ...]
    weight: float = 1.0


def _missing(path: str) -> DataError:
    if _HUB_NAME.fullmatch(path) and Path(path).suffix not in SUFFIXES:
        return DataError(
            f"{path}: not a local file or directory, and hub data sets are never downloaded (runs are "
            f"offline: HF_HUB_OFFLINE=1). Where there is network, run datasets.load_dataset({path!r})"
            ".save_to_disk(DIR), copy DIR here and point the data path at it."
        )
    return DataError(f"{path}: no such file or directory (only local data is read)")


def _file(path: str, split: str) -> SourceFile:
    p = Path(path)
    if p.is_dir():
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            return SourceFile(path, "saved", split)
        raise DataError(
            f"{path}: a directory must be written by datasets' save_to_disk (use a glob for files)"
        )
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data file type; expected {', '.join(SUFFIXES)} or a saved data set")
    return SourceFile(path, kind, split)


def resolve(spec: DataSource) -> Source:
    """The files of a configured source (a glob expands to its matches, sorted)."""
    if glob.has_magic(spec.path):
        matches = sorted(glob.glob(spec.path, recursive=True))  # noqa: PTH207 (Path.glob takes no absolute pattern)
        if not matches:
            raise DataError(f"{spec.path}: the glob matches no file")
    elif Path(spec.path).exists():
        matches = [spec.path]
    else:
        raise _missing(spec.path)
    return Source(spec.path, tuple(_file(m, spec.split) for m in matches), spec.weight)


def fingerprint(f: SourceFile) -> str:
    """Identity of a file's content for the cache: its path, size and modification time (as datasets)."""
    p = Path(f.path).resolve()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    parts = [f"{q}:{q.stat().st_size}:{q.stat().st_mtime_ns}" for q in files]
    return hashlib.sha256("\n".join([f.kind, f.split, *parts]).encode()).hexdigest()


def _saved(f: SourceFile) -> datasets.Dataset:
    loaded = datasets.load_from_disk(f.path)
    if isinstance(loaded, datasets.DatasetDict):
        if f.split not in loaded:
            raise DataError(
                f"{f.path}: no split {f.split!r} (it has {', '.join(loaded)}); set the source's split"
            )
        return loaded[f.split]
    return loaded


def _json_rows(f: SourceFile) -> list[str] | None:
    """A .json file's rows as JSON texts: a top-level array of rows; None if it is JSON lines."""
    text = Path(f.path).read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, list):
        raise DataError(f"{f.path}: expected a JSON array of rows (or JSON lines)")
    return [json.dumps(v) for v in value]


def load(f: SourceFile) -> datasets.Dataset:
    """All rows of one file, map-style (memory-mapped Arrow)."""
    try:
        if f.kind == "saved":
            return _saved(f)
        if f.kind == "json" and (rows := _json_rows(f)) is not None:
            return datasets.Dataset.from_dict({JSON_COLUMN: rows})
        if f.kind in ("json", "jsonl"):
            return datasets.load_dataset("text", data_files=f.path, split="train").rename_column(
                "text", JSON_COLUMN
            )
        return datasets.load_dataset(f.kind, data_files=f.path, split="train")
    except DataError:
        raise
    except Exception as e:  # pyarrow, pandas and datasets raise their own types for unreadable files
        raise DataError(f"{f.path}: cannot be read as {f.kind}: {e}") from e


def stream(f: SourceFile, skip: int = 0) -> Iterator[dict[str, Any]]:
    """The rows of one file from row ``skip`` on, read lazily (datasets streaming over local files)."""
    if f.kind == "json" and (rows := _json_rows(f)) is not None:
        yield from ({JSON_COLUMN: r} for r in rows[skip:])
        return
    try:
        if f.kind == "saved":
            it: datasets.IterableDataset = _saved(f).to_iterable_dataset()
        elif f.kind in ("json", "jsonl"):
            it = datasets.load_dataset("text", data_files=f.path, split="train", streaming=True)
            it = it.rename_column("text", JSON_COLUMN)
        else:
            it = datasets.load_dataset(f.kind, data_files=f.path, split="train", streaming=True)
    except Exception as e:
        raise DataError(f"{f.path}: cannot be read as {f.kind}: {e}") from e
    yield from it.skip(skip) if skip else it


def cache_root(configured: str | None) -> Path:
    """Where tokenised data is cached (config ``data.cache_dir``, else inside datasets' cache)."""
    if configured:
        return Path(configured)
    return Path(os.fspath(datasets.config.HF_DATASETS_CACHE)) / "riemann_tune_tokenized"
