"""Lazy row readers for data files: .jsonl, .json (a list), .csv, .tsv and .parquet."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from lorafleet.data.examples import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
# Cells that hold structured values; in CSV/TSV they are written as JSON text.
JSON_CELLS = ("messages", "choices")

Row = tuple[str, dict]  # (location for messages, the row)


def iter_rows(path: Path) -> Iterator[Row]:
    """Yield (location, row) for every non-blank row of `path`; the location is "file:line"
    (or "file: row N" for parquet), so each row-level error can say where it is."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        expected = ", ".join(SUFFIXES)
        raise DataError(f"{path}: unknown file type {suffix or '(none)'!r} (expected {expected})")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if suffix == ".parquet":
        yield from _parquet(path)
        return
    try:
        if suffix == ".jsonl":
            yield from _jsonl(path)
        elif suffix == ".json":
            yield from _json_list(path)
        else:
            yield from _delimited(path, "\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value


def _jsonl(path: Path) -> Iterator[Row]:
    # utf-8-sig: files saved by some editors start with a BOM that json.loads rejects.
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg})") from exc
            yield where, _object(value, where)


def _json_list(path: Path) -> Iterator[Row]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, found {type(data).__name__}")
    # Walk the (already valid) list again with raw_decode to learn the line each item starts
    # on: pretty-printed files are common, and "item 812" is hard to find in an editor.
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0
    for _ in data:
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        value, pos = decoder.raw_decode(text, pos)
        where = f"{path}:{line}"
        yield where, _object(value, where)


def _delimited(path: Path, delimiter: str) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        keys = [k.strip() for k in header]
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            # line_num is the physical line the row ends on (quoted cells may span lines).
            where = f"{path}:{reader.line_num}"
            if len(cells) != len(keys):
                names = ", ".join(keys)
                raise DataError(
                    f"{where}: {len(cells)} fields, but the header has {len(keys)} ({names})"
                )
            row = dict(zip(keys, cells, strict=True))
            for key in JSON_CELLS:
                if key in row:
                    row[key] = _json_cell(row[key], key, where)
            yield where, row


def _json_cell(cell: str, key: str, where: str):
    try:
        return json.loads(cell)
    except json.JSONDecodeError as exc:
        problem = f'field "{key}" must be a JSON list in CSV/TSV ({exc.msg})'
        raise DataError(f"{where}: {problem}") from exc


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq  # imported here: only parquet files need it

    try:
        file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    number = 0
    # Batches keep memory flat and let `limit=` stop early on a large file.
    for batch in file.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield f"{path}: row {number}", row
