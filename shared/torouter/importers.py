"""Converters from published routing benchmarks into torouter's routing-data format."""

from __future__ import annotations

import ast
import csv
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .data import DataError, Record, validate_record

ROUTERBENCH_META = {"sample_id", "prompt", "eval_name", "oracle_model_to_route_to", "", "Unnamed: 0"}
_RESPONSE_SUFFIX = "|model_response"
_COST_SUFFIX = "|total_cost"


def _text(value: Any) -> str:
    """RouterBench stores prompts and answers as stringified Python lists of strings."""
    if isinstance(value, (list, tuple)):
        return "\n".join(str(v) for v in value)
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(parsed, (list, tuple)):
            return "\n".join(str(v) for v in parsed)
    return text


def _number(value: Any, where: str, column: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: column {column!r} is not a number: {value!r}") from None
    return None if math.isnan(number) else number


def routerbench_records(rows: Iterable[Mapping[str, Any]], source: str) -> Iterator[Record]:
    """Records from RouterBench rows (CSV dict rows or DataFrame records).

    Columns: ``sample_id``, ``prompt``, ``eval_name``, ``<model>`` (score),
    ``<model>|model_response``, ``<model>|total_cost``. An empty score cell is unobserved.
    """
    return _records(((f"row {i}", row) for i, row in enumerate(rows)), source)


def _records(rows: Iterable[tuple[int | str, Mapping[str, Any]]], source: str) -> Iterator[Record]:
    """``routerbench_records`` over ``(location, row)`` pairs; errors name the location."""
    models: list[str] | None = None
    for location, row in rows:
        where = f"{source}:{location}"
        if models is None:
            missing = {"sample_id", "prompt"} - set(row)
            if missing:
                raise DataError(f"{source}: not a RouterBench file (missing columns {sorted(missing)})")
            models = [c for c in row if c not in ROUTERBENCH_META and "|" not in str(c)]
            if not models:
                raise DataError(f"{source}: no model score columns found")
        responses = {}
        for model in models:
            score = _number(row.get(model), where, model)
            cost = _number(row.get(model + _COST_SUFFIX), where, model + _COST_SUFFIX)
            if score is None and cost is None:
                continue
            response: dict[str, Any] = {"score": score, "cost": cost}
            if score is not None and cost is None:
                response["score"] = None  # a score without its cost cannot be routed on
            text = row.get(model + _RESPONSE_SUFFIX)
            if text not in (None, ""):
                response["text"] = _text(text)
            responses[model] = response
        obj: dict[str, Any] = {"id": str(row["sample_id"]), "prompt": _text(row["prompt"]), "responses": responses}
        if row.get("eval_name"):
            obj["task"] = str(row["eval_name"])
        if row.get("oracle_model_to_route_to"):
            obj["routerbench_oracle"] = str(row["oracle_model_to_route_to"])
        yield validate_record(obj, where)


def read_routerbench(paths: Iterable[str | os.PathLike], allow_pickle: bool = False) -> list[Record]:
    """Read RouterBench CSV files, or its published pandas pickle (only with ``allow_pickle``)."""
    records: list[Record] = []
    seen: set[str] = set()
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        if path.suffix in (".pkl", ".pickle"):
            rows = _pickle_rows(path, allow_pickle)
        else:
            csv.field_size_limit(1 << 30)
            rows = _csv_rows(path)
        for record in _records(rows, str(path)):
            # RouterBench reuses a few sample_ids for different prompt variants; keep each
            # row, numbering the repeats so ids stay unique.
            base, n = record.id, 1
            while record.id in seen:
                n += 1
                record.id = f"{base}#{n}"
            seen.add(record.id)
            records.append(record)
    if not records:
        raise DataError("no records found in the given RouterBench files")
    return records


def _csv_rows(path: Path) -> Iterator[tuple[int | str, dict[str, Any]]]:
    """Rows with the file line each one ends on (cells may hold newlines)."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            yield reader.line_num, row


def _pickle_rows(path: Path, allow_pickle: bool) -> Iterator[tuple[int | str, dict[str, Any]]]:
    if not allow_pickle:
        raise DataError(f"{path}: a pickle file can run arbitrary code when read; pass --allow-pickle "
                        "(allow_pickle=True) only for a file you trust, e.g. RouterBench's own release")
    try:
        import pandas as pd
    except ImportError:
        raise DataError("reading RouterBench pickles needs pandas: pip install pandas") from None
    frame = pd.read_pickle(path)
    if not hasattr(frame, "to_dict"):
        raise DataError(f"{path}: expected a pandas DataFrame, got {type(frame).__name__}")
    for i, row in enumerate(frame.reset_index(drop=True).to_dict(orient="records")):
        yield f"row {i}", row
