"""Read data files and tokenize them into :class:`Examples` (train and validation sets)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from .config import FORMATS, ON_ERROR
from .formats import (
    DataError,
    collect_label_names,
    encode_chat,
    encode_classification,
    encode_instruction,
    encode_text,
    token_blocks,
)

SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclasses.dataclass
class Examples:
    """Tokenized examples plus what was skipped: ``skipped`` maps ``file:row`` to the reason."""

    rows: list[dict]
    skipped: dict[str, str]
    label_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def data_path(path: str, key: str) -> str:
    """A data file's path; ``asset:NAME`` names a data set that installs offline (sora_dist.assets.DATASETS)."""
    from . import assets

    try:
        return assets.resolve(path, assets.DATASETS, key)
    except KeyError as err:
        raise DataError(err.args[0]) from None


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a local data file through ``datasets`` (row numbers in errors are 1-based)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(SUFFIXES)}")
    from datasets import load_dataset

    try:
        dataset = load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parser errors in several exception types
        raise DataError(f"{_first_bad_line(path) or path}: cannot be read as {kind}: {err}") from err
    return dataset.to_list()


def _first_bad_line(path: Path) -> str | None:
    """``file:row N`` of the first line of a JSONL file that is not a JSON object."""
    if path.suffix.lower() != ".jsonl":
        return None
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                if isinstance(json.loads(line), dict):
                    continue
            except json.JSONDecodeError:
                pass
            return f"{path}:row {number}"
    return None


def tokenize_file(
    path: str | Path,
    tokenizer,
    format: str,
    max_length: int,
    on_error: str = "fail",
    label_names: list[str] | None = None,
) -> Examples:
    """Read and tokenize one file; sequences longer than ``max_length`` are truncated."""
    if format not in FORMATS:
        raise DataError(f"data format must be one of {FORMATS}, got {format!r}")
    if on_error not in ON_ERROR:
        raise DataError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if format == "blocks":
        return Examples(read_token_blocks(path, max_length, tokenizer), {})
    rows = read_rows(path)
    if format == "classification" and label_names is None:
        label_names = collect_label_names(rows)
    encoders: dict[str, Callable] = {
        "instruction": encode_instruction,
        "chat": encode_chat,
        "text": encode_text,
        "classification": lambda row, tok, where: encode_classification(row, tok, where, label_names),
    }
    out, skipped = [], {}
    for number, row in enumerate(rows, 1):
        where = f"{path}:row {number}"
        try:
            example = encoders[format](row, tokenizer, where)
        except DataError as err:
            if on_error == "fail":
                raise
            skipped[where] = str(err)
            continue
        ids = example["input_ids"][:max_length]
        labels = example["labels"] if format == "classification" else example["labels"][:max_length]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if not out:
        raise DataError(f"{path}: no usable rows ({len(skipped)} skipped)")
    return Examples(out, skipped, label_names)


def split_holdout(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """A seeded random split into (train, validation) with ``fraction`` held out."""
    if not 0 < fraction < 1:
        raise DataError(f"validation_fraction must be in (0, 1), got {fraction}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(fraction * len(examples))))
    pick = lambda idx: Examples([examples.rows[i] for i in idx], {}, examples.label_names)  # noqa: E731
    return pick(order[n_val:]), pick(order[:n_val])




def read_token_blocks(path: str | Path, seq_len: int, tokenizer=None) -> list[dict]:
    """The ``blocks`` format: a JSONL file of {"input_ids": [...]} or {"text": "..."} lines (text
    needs ``tokenizer``), joined into one stream with EOS after each text and cut into blocks."""
    ids: list[int] = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: invalid JSON: {err.msg}") from err
            if isinstance(record, dict) and "input_ids" in record:
                ids.extend(int(t) for t in record["input_ids"])
            elif isinstance(record, dict) and isinstance(record.get("text"), str) and tokenizer is not None:
                ids.extend(encode_text(record, tokenizer, f"{path}:{number}")["input_ids"])
            else:
                raise DataError(f'{path}:{number}: each line needs "input_ids" (or "text", given a tokenizer)')
    return token_blocks(ids, seq_len, str(path))
