"""What a run trains on, shown as text: each example with the tokens that get the loss marked, and
the figures of a tokenized set (rows, tokens, labelled tokens, rows truncated or dropped).

``sora-train CONFIG --preview [N]`` prints both without loading the model; every training run
prints its first example at start.
"""

from __future__ import annotations

import numbers
import os
import sys
from typing import Sequence

from .formats import IGNORE

OPEN, CLOSE = "[[", "]]"
GREEN, RESET = "\x1b[1;32m", "\x1b[0m"  # trained text in bold green on a terminal
FIRST_EXAMPLE_CHARS = 1500  # what a training run prints of its first example
PARTIAL = "\ufffd"  # what decoding shows for the bytes of an incomplete character
CONTEXT_TOKENS = 16  # tokens decoded before a run to find the text the run adds (its leading space, a merged character)


def use_color(stream=None) -> bool:
    """Colour on a terminal, unless NO_COLOR is set."""
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")


def trained_spans(labels: Sequence[int], length: int) -> list[tuple[int, int, bool]]:
    """(start, end, trained) of each run of consecutive tokens with the same status; a token is
    trained when its label is not IGNORE (positions past the labels are not)."""
    spans: list[tuple[int, int, bool]] = []
    for i in range(length):
        trained = i < len(labels) and int(labels[i]) != IGNORE
        if spans and spans[-1][2] == trained:
            spans[-1] = (spans[-1][0], i + 1, trained)
        else:
            spans.append((i, i + 1, trained))
    return spans


def label_text(label, label_names: Sequence[str] | None) -> str:
    if isinstance(label, float) and not label.is_integer():
        return f"{label:g}"
    if label_names and isinstance(label, (int, float)) and 0 <= int(label) < len(label_names):
        return str(label_names[int(label)])
    return f"{label:g}" if isinstance(label, float) else str(label)


def mark_example(input_ids, labels, tokenizer, color: bool = False, label_names: Sequence[str] | None = None,
                 limit: int | None = None) -> str:  # fmt: skip
    """The example as text with its trained tokens marked: ``[[...]]`` around each run of trained
    tokens, or bold green when ``color``. Each run's text is what its tokens add to the decoded text
    of the tokens just before them (``tokenizer.decode(..., skip_special_tokens=False)``), so spaces
    and newlines stay where the tokenizer puts them. A classification example (``labels`` one number)
    is its text and ``-> label: NAME`` (``label_names``: the class names). ``limit``: at most that
    many characters of text, then ``...`` and the example's size."""
    ids = [int(t) for t in input_ids]
    if isinstance(labels, numbers.Number):
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if limit is not None and len(text) > limit:
            text = text[:limit] + f" ... ({len(ids)} tokens in all)"
        return f"{text}\n-> label: {label_text(labels, label_names)}"
    labels = [int(label) for label in labels]
    opening, closing = (GREEN, RESET) if color else (OPEN, CLOSE)
    out: list[str] = []
    shown = 0
    for start, end, trained in trained_spans(labels, len(ids)):
        context = max(0, start - CONTEXT_TOKENS)
        # A character whose bytes are split between two runs is shown once, in the later run.
        before = tokenizer.decode(ids[context:start], skip_special_tokens=False).rstrip(PARTIAL)
        upto = tokenizer.decode(ids[context:end], skip_special_tokens=False)
        upto = upto if end == len(ids) else upto.rstrip(PARTIAL)
        piece = upto[len(before) :] if upto.startswith(before) else tokenizer.decode(ids[start:end], skip_special_tokens=False)
        cut = limit is not None and shown + len(piece) > limit
        if cut:
            piece = piece[: limit - shown]
        shown += len(piece)
        out.append(f"{opening}{piece}{closing}" if trained and piece else piece)
        if cut:
            out.append(f" ... ({len(ids)} tokens in all)")
            break
    return "".join(out)


def marking_note(color: bool) -> str:
    return "trained tokens in green" if color else f"trained tokens in {OPEN}...{CLOSE}"


def first_example(examples, tokenizer, color: bool = False, limit: int = FIRST_EXAMPLE_CHARS) -> str:
    """The header line and the first example of a set, marked and cut at ``limit`` characters."""
    row = examples[0]
    if examples.format == "classification":
        header = "first training example (text -> label):"
    else:
        header = f"first training example ({marking_note(color)}):"
    return header + "\n" + mark_example(row["input_ids"], row["labels"], tokenizer, color, examples.label_names, limit)


def preview_examples(examples, tokenizer, count: int, color: bool = False) -> str:
    """The first ``count`` examples, each under a line giving its number and size."""
    blocks = []
    for i in range(min(count, len(examples))):
        row = examples[i]
        size = f"{len(row['input_ids'])} tokens"
        if examples.format != "classification":
            size += f", {sum(1 for label in row['labels'] if int(label) != IGNORE)} trained"
        marked = mark_example(row["input_ids"], row["labels"], tokenizer, color, examples.label_names)
        blocks.append(f"--- example {i + 1} of {len(examples):,} ({size}) ---\n{marked}")
    return "\n\n".join(blocks)


# -- figures ---------------------------------------------------------------------------------------
FIGURES = ("rows", "tokens", "labelled_tokens", "truncated", "no_label", "skipped")


def data_figures(examples) -> dict:
    """rows, tokens, labelled tokens (and their share of the tokens); rows truncated at max_length,
    rows dropped for having no label and all rows dropped, of the source (None where the set does
    not record them). A classification set has one label per row."""
    stats = getattr(examples, "stats", None)
    if stats is not None:
        figures = {key: stats.get(key) for key in FIGURES}
    else:
        figures = {**column_sums(examples), "truncated": None, "no_label": None, "skipped": getattr(examples, "skipped_count", None)}
    tokens, labelled = figures["tokens"] or 0, figures["labelled_tokens"] or 0
    figures["labelled_share"] = labelled / tokens if tokens else 0.0
    figures["format"] = examples.format
    return figures


def column_sums(examples) -> dict:
    """rows, tokens and labelled tokens summed over the Arrow columns (no row is read into Python)."""
    import pyarrow.compute as pc

    dataset = examples.dataset
    rows = len(dataset)
    if rows == 0:
        return {"rows": 0, "tokens": 0, "labelled_tokens": 0}
    names = [c for c in ("length", "num_labels", "input_ids", "labels") if c in dataset.column_names]
    wanted = [c for c in ("length", "num_labels") if c in names] or [c for c in ("input_ids",) if c in names]
    if examples.format not in ("classification", "blocks") and "num_labels" not in names:
        wanted.append("labels")
    indices = getattr(dataset, "_indices", None)
    if indices is None:
        columns = {c: dataset.data.column(c) for c in wanted}
    elif hasattr(indices, "column"):  # a selection: its rows of the columns needed
        rows_taken = indices.column(0)
        columns = {c: pc.take(dataset.data.column(c), rows_taken) for c in wanted}
    else:
        taken = dataset.select_columns(wanted).with_format("arrow")[:]
        columns = {c: taken.column(c) for c in wanted}
    if "length" in columns:
        tokens = int(pc.sum(columns["length"]).as_py() or 0)
    else:
        tokens = int(pc.sum(pc.list_value_length(columns["input_ids"])).as_py() or 0)
    if examples.format == "classification":
        labelled = rows
    elif examples.format == "blocks":
        labelled = tokens
    elif "num_labels" in columns:
        labelled = int(pc.sum(columns["num_labels"]).as_py() or 0)
    else:
        flat = pc.list_flatten(columns["labels"])
        labelled = int(pc.sum(pc.not_equal(flat, IGNORE).cast("int64")).as_py() or 0)
    return {"rows": rows, "tokens": tokens, "labelled_tokens": labelled}


def _count(value) -> str:
    return "n/a" if value is None else f"{value:,}"


def format_figures(figures: dict, name: str = "training") -> str:
    """Two lines: the set's size and labels, then the rows the source lost or cut."""
    rows, tokens = figures["rows"], figures["tokens"]
    per_row = f", {tokens / rows:.1f} per row" if rows else ""
    if figures.get("format") == "classification":
        labels = "one class label per row"
    else:
        labels = f"{_count(figures['labelled_tokens'])} labelled tokens ({100 * figures['labelled_share']:.1f}%)"
    return (
        f"{name} set: {_count(rows)} rows, {_count(tokens)} tokens{per_row}, {labels}\n"
        f"  rows truncated at data.max_length: {_count(figures['truncated'])}; rows with no label (dropped): "
        f"{_count(figures['no_label'])}; rows skipped in all: {_count(figures['skipped'])}"
    )
