"""Data shapes and their loss masks (``data.format``): one row in, one tokenized example out.

- ``instruction``: ``instruction``, optional ``input``, ``output``; loss on the output only.
- ``chat``: ``messages`` = [{"role", "content"}, ...] rendered with the tokenizer's chat template;
  loss only on the assistant turns (:mod:`sora_dist.data.chat`).
- ``text``: ``text``; causal LM loss on every token of each row.
- ``blocks``: ``text`` or ``input_ids``; every row's tokens joined into one stream (EOS between
  rows) and cut into ``max_length`` blocks, loss on every token (continued pre-training).
- ``classification``: ``text``, optional ``text_pair``, ``label`` (a class name or an integer).

Every example becomes ``input_ids`` and ``labels`` (``-100`` where no loss is taken). A malformed
row raises :class:`DataError` naming the file and row.
"""

from __future__ import annotations

import math

import torch

IGNORE = -100
NO_LABEL = "nothing to learn"  # in the message of every row dropped for having no labelled token
INSTRUCTION_TEMPLATE = "{instruction}\n\n{input}"


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and row."""


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
    if not output.strip():
        raise DataError(f"{where}: empty 'output', {NO_LABEL}")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    output_ids = _with_eos(tokenizer, tokenizer(output, add_special_tokens=False)["input_ids"])
    return {"input_ids": prompt_ids + output_ids, "labels": [IGNORE] * len(prompt_ids) + output_ids, "prompt_length": len(prompt_ids)}


def encode_text(row: dict, tokenizer, where: str) -> dict:
    text = _text(row, "text", where)
    if not text.strip():
        raise DataError(f"{where}: empty 'text', {NO_LABEL}")
    ids = _with_eos(tokenizer, tokenizer(text)["input_ids"])
    return {"input_ids": ids, "labels": list(ids)}


def encode_classification(row: dict, tokenizer, where: str, label_names: list[str] | None, num_labels: int | None = None) -> dict:
    """``num_labels`` 1 is regression (a number per row); otherwise a class name of ``label_names``
    or an integer class id in [0, num_labels)."""
    text = _text(row, "text", where)
    pair = _text(row, "text_pair", where, required=False) or None
    encoded = tokenizer(text, pair, truncation=False)
    label = row.get("label")
    if isinstance(label, bool) or label is None or (isinstance(label, float) and not math.isfinite(label)):
        raise DataError(f"{where}: field 'label' must be a class name, an integer class id or (regression) a number, got {label!r}")
    if num_labels == 1:
        if not isinstance(label, (int, float)):
            raise DataError(f"{where}: label {label!r} is not a number; model.num_labels 1 trains a regression on numbers")
        return {"input_ids": encoded["input_ids"], "labels": float(label)}
    if isinstance(label, float):
        if not label.is_integer():
            raise DataError(f"{where}: label {label!r} is not a class id; for regression set model.num_labels: 1")
        label = int(label)
    classes = len(label_names) if label_names else num_labels
    if isinstance(label, str):
        if label_names is None or label not in label_names:
            raise DataError(f"{where}: unknown label {label!r}; known labels: {label_names}")
        label = label_names.index(label)
    elif not isinstance(label, int) or label < 0 or (classes is not None and label >= classes):
        raise DataError(f"{where}: label {label!r} is out of range for {classes if classes is not None else 'any number of'} classes")
    return {"input_ids": encoded["input_ids"], "labels": int(label)}


def token_blocks(ids: list[int], block_len: int, where: str) -> list[dict]:
    """Cut one token stream into ``block_len`` blocks (the remainder is dropped); loss on every token."""
    if len(ids) < block_len:
        raise DataError(f"{where}: {len(ids)} tokens in all, fewer than one block of {block_len}")
    blocks = torch.tensor(ids[: len(ids) // block_len * block_len]).view(-1, block_len)
    return [{"input_ids": block, "labels": block.tolist()} for block in blocks]
