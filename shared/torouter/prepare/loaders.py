"""Build prompts files from the paper's four public benchmarks with the ``datasets`` library.

Each loader returns prompt rows ``{"id", "prompt", "reference", "task"}`` ready for
``torouter prepare``. By default they read the Hugging Face hub (network needed):

=================  ==================================  =========  ===========
loader             hub dataset, config                 split      reference
=================  ==================================  =========  ===========
``arc-challenge``  allenai/ai2_arc, ARC-Challenge      test       answer letter
``gsm8k``          openai/gsm8k, main                  test       worked answer ending ``#### N``
``mbpp``           google-research-datasets/mbpp, full test       the assert tests
``pubmedqa``       qiaojin/PubMedQA, pqa_labeled       train      yes / no / maybe
=================  ==================================  =========  ===========

Each benchmark has a natural metric (``NATURAL_METRICS``), the one ``torouter prepare``
scores its records with when no metric is given: choice for ARC and PubMedQA, numeric for
GSM8K, code for MBPP.

``source`` reads a local copy instead: a data file (parquet, json/jsonl, csv) with the
hub's columns, or a directory laid out like the hub repository
(``<dir>/<config>/<split>-*.parquet``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..data import DataError

_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def load_rows(hub_id: str, config: str | None, split: str, source: str | os.PathLike | None = None):
    """A ``datasets.Dataset`` from the hub or from a local file/directory in the hub's layout."""
    import datasets

    if source is None:
        try:
            return datasets.load_dataset(hub_id, config, split=split)
        except Exception as exc:  # noqa: BLE001 - offline, missing, renamed: all need the same advice
            raise DataError(f"could not load {hub_id} ({config}, {split}) from the Hugging Face hub: "
                            f"{type(exc).__name__}: {exc}. Pass a local copy as source.") from None
    path = Path(source).expanduser()
    if path.is_dir():
        folder = path / config if config and (path / config).is_dir() else path
        files = sorted(str(p) for p in folder.glob(f"{split}-*") if p.suffix in _BUILDERS)
        if not files:
            raise DataError(f"{folder}: no {split}-* data files (expected the hub layout <config>/<split>-*.parquet)")
        builder: str | None = _BUILDERS[Path(files[0]).suffix]
    elif path.is_file():
        builder = _BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(f"{path}: unsupported file type (use {', '.join(sorted(_BUILDERS))})")
        files = [str(path)]
    else:
        raise DataError(f"{path}: no such file or directory")
    return datasets.load_dataset(builder, data_files={split: files}, split=split)


def _need(row: dict[str, Any], columns: Iterable[str], name: str, index: int) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise DataError(f"{name} row {index}: missing column(s) {', '.join(missing)}")


def arc_row(row: dict[str, Any]) -> dict[str, Any]:
    choices = row["choices"]
    options = "\n".join(f"{label}. {text}" for label, text in zip(choices["label"], choices["text"]))
    prompt = f"{row['question'].strip()}\n{options}\nAnswer with the letter of the correct option."
    return {"id": f"arc-{row['id']}", "prompt": prompt, "reference": str(row["answerKey"]).strip(),
            "task": "arc-challenge"}


def gsm8k_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    prompt = f"{row['question'].strip()}\nSolve it step by step and end with '#### <number>'."
    return {"id": f"gsm8k-{index}", "prompt": prompt, "reference": row["answer"].strip(), "task": "gsm8k"}


def mbpp_row(row: dict[str, Any]) -> dict[str, Any]:
    text = row.get("text") or row.get("prompt") or ""  # "full" has text, "sanitized" has prompt
    tests = list(row["test_list"])
    setup = (row.get("test_setup_code") or "").strip()
    imports = "\n".join(row.get("test_imports") or [])
    prompt = f"{text.strip()} Your code should pass this test:\n{tests[0]}"
    reference = "\n".join(part for part in (imports, setup, "\n".join(tests)) if part)
    return {"id": f"mbpp-{row['task_id']}", "prompt": prompt, "reference": reference, "task": "mbpp"}


def pubmedqa_row(row: dict[str, Any]) -> dict[str, Any]:
    context = row["context"]
    passages = context.get("contexts", []) if isinstance(context, dict) else [str(context)]
    prompt = ("Context: " + " ".join(p.strip() for p in passages) + f"\nQuestion: {row['question'].strip()}"
              "\nAnswer yes, no or maybe.")
    return {"id": f"pubmedqa-{row['pubid']}", "prompt": prompt, "reference": row["final_decision"].strip(),
            "task": "pubmedqa"}


def _convert(dataset, name: str, columns: tuple[str, ...], convert: Callable, limit: int | None,
             with_index: bool = False) -> list[dict[str, Any]]:
    rows = []
    for i, row in enumerate(dataset):
        if limit is not None and i >= limit:
            break
        _need(row, columns, name, i)
        rows.append(convert(row, i) if with_index else convert(row))
    if not rows:
        raise DataError(f"{name}: no rows")
    return rows


def load_arc_challenge(split: str = "test", limit: int | None = None, source=None) -> list[dict[str, Any]]:
    data = load_rows("allenai/ai2_arc", "ARC-Challenge", split, source)
    return _convert(data, "ARC-Challenge", ("id", "question", "choices", "answerKey"), arc_row, limit)


def load_gsm8k(split: str = "test", limit: int | None = None, source=None) -> list[dict[str, Any]]:
    data = load_rows("openai/gsm8k", "main", split, source)
    return _convert(data, "GSM8K", ("question", "answer"), gsm8k_row, limit, with_index=True)


def load_mbpp(split: str = "test", limit: int | None = None, source=None, config: str = "full") -> list[dict[str, Any]]:
    data = load_rows("google-research-datasets/mbpp", config, split, source)
    return _convert(data, "MBPP", ("task_id", "test_list"), mbpp_row, limit)


def load_pubmedqa(split: str = "train", limit: int | None = None, source=None) -> list[dict[str, Any]]:
    data = load_rows("qiaojin/PubMedQA", "pqa_labeled", split, source)
    return _convert(data, "PubMedQA", ("pubid", "question", "context", "final_decision"), pubmedqa_row, limit)


NATURAL_METRICS: dict[str, str] = {
    "arc-challenge": "choice",
    "gsm8k": "numeric",
    "mbpp": "code",
    "pubmedqa": "choice",
}
"""The metric each loader's task (its records' ``task``) is scored with by default."""

LOADERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "arc-challenge": load_arc_challenge,
    "gsm8k": load_gsm8k,
    "mbpp": load_mbpp,
    "pubmedqa": load_pubmedqa,
}


def load_benchmark(name: str, limit: int | None = None, source=None, split: str | None = None) -> list[dict[str, Any]]:
    """Prompt rows of one of the paper's benchmarks by name (see ``LOADERS``)."""
    if name not in LOADERS:
        raise DataError(f"unknown benchmark {name!r}; choose one of {', '.join(LOADERS)}")
    kwargs = {"limit": limit, "source": source}
    if split is not None:
        kwargs["split"] = split
    return LOADERS[name](**kwargs)
