"""Training data: local JSONL/JSON/CSV/Parquet files in four shapes, tokenized with loss masks.

Shapes (``data.format``):
- ``instruction``: ``instruction``, optional ``input``, ``output``; loss on the output only.
- ``chat``: ``messages`` = [{"role", "content"}, ...] rendered with the tokenizer's chat template;
  loss only on the assistant turns.
- ``text``: ``text``; causal LM loss on every token.
- ``classification``: ``text``, optional ``text_pair``, ``label`` (a class name or an integer).

Every example becomes ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` where no loss is
taken); :func:`pad_collate` pads a batch. A malformed row raises :class:`DataError` naming the
file and row, or is skipped and counted when ``on_error="skip"``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import torch

FORMATS = ("instruction", "chat", "text", "classification")
SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE = -100
INSTRUCTION_TEMPLATE = "{instruction}\n\n{input}"


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and row."""


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
    import json

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


def _text(row: dict, key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):
        if required:
            raise DataError(f"{where}: missing field {key!r} (row has {sorted(row)})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be text, got {type(value).__name__}")
    return value


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def encode_instruction(row: dict, tokenizer, where: str) -> dict:
    instruction = _text(row, "instruction", where)
    prompt = INSTRUCTION_TEMPLATE.format(instruction=instruction, input=_text(row, "input", where, required=False)).rstrip() + "\n\n"
    output = _text(row, "output", where)
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    output_ids = _with_eos(tokenizer, tokenizer(output, add_special_tokens=False)["input_ids"])
    return {"input_ids": prompt_ids + output_ids, "labels": [IGNORE] * len(prompt_ids) + output_ids}


def encode_text(row: dict, tokenizer, where: str) -> dict:
    ids = _with_eos(tokenizer, tokenizer(_text(row, "text", where))["input_ids"])
    return {"input_ids": ids, "labels": list(ids)}


def encode_chat(row: dict, tokenizer, where: str) -> dict:
    """Render with the chat template; label the tokens each assistant turn adds, nothing else.

    Each assistant turn's tokens are the difference between the rendering up to and including
    it and the rendering of what precedes it with the generation prompt.
    """
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise DataError(f"{where}: messages[{i}] must have 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: the tokenizer has no chat template; use format 'instruction' or 'text'")

    def render(upto: int, generation_prompt: bool) -> list[int]:
        if upto == 0:
            return []
        text = tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = render(len(messages), False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(render(i, True)), len(render(i + 1, False))
        if ids[:end] != render(i + 1, False):
            raise DataError(f"{where}: the chat template does not render conversations prefix by prefix; cannot mask turns")
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "labels": labels}


def encode_classification(row: dict, tokenizer, where: str, label_names: list[str] | None) -> dict:
    text = _text(row, "text", where)
    pair = row.get("text_pair")
    encoded = tokenizer(text, pair if isinstance(pair, str) else None, truncation=False)
    label = row.get("label")
    if isinstance(label, bool) or label is None:
        raise DataError(f"{where}: field 'label' must be a class name, an integer or (regression) a float, got {label!r}")
    if isinstance(label, float):
        return {"input_ids": encoded["input_ids"], "labels": label}
    if isinstance(label, str):
        if label_names is None or label not in label_names:
            raise DataError(f"{where}: unknown label {label!r}; known labels: {label_names}")
        label = label_names.index(label)
    elif not isinstance(label, int) or (label_names is not None and not 0 <= label < len(label_names)):
        raise DataError(f"{where}: label {label!r} is out of range for {len(label_names or [])} classes")
    return {"input_ids": encoded["input_ids"], "labels": int(label)}


def collect_label_names(rows: list[dict]) -> list[str] | None:
    """Sorted class names when labels are text; None when they are integers."""
    names = {r.get("label") for r in rows if isinstance(r.get("label"), str)}
    return sorted(names) if names else None


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
    if on_error not in ("fail", "skip"):
        raise DataError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
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


def pad_collate(examples: Sequence[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    def pad(seq, value):
        return list(seq) + [value] * (width - len(seq))

    batch = {
        "input_ids": torch.tensor([pad(e["input_ids"], pad_id) for e in examples]),
        "attention_mask": torch.tensor([pad(e["attention_mask"], 0) for e in examples]),
    }
    if not isinstance(examples[0]["labels"], list):  # one class index (or regression target) per example
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    else:
        batch["labels"] = torch.tensor([pad(e["labels"], IGNORE) for e in examples])
    return batch
