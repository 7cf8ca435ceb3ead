"""The data pipeline: sources -> one ``datasets.Dataset`` -> tokenized once, cached on disk, memory-mapped.

- Sources (``data.train_file``, one or a list): a local file (.jsonl/.json/.csv/.parquet/.arrow),
  a folder written by ``Dataset.save_to_disk`` or holding data files, ``asset:NAME``, or a hub
  data set ``org/name`` (optionally ``org/name:subset@split``). Several sources are concatenated, or
  interleaved with ``data.train_weights`` (seeded).
- Column shapes: the format's own fields, ShareGPT ``conversations`` of ``from``/``value`` (chat),
  and any renaming in ``data.columns`` ({our field: their column}).
- Tokenization is one ``Dataset.map(batched=True, num_proc=...)``: written by the main process
  first under a fingerprint of the sources' content, the tokenizer, the template, the format and
  the lengths; other ranks, reruns and resumes load it from disk in seconds. The result stays
  Arrow-backed (memory-mapped), so memory does not grow with the number of rows.
- A malformed row, or one with no labelled token left after truncation, names its source and row:
  it stops the run (``on_error: fail``) or is dropped and counted (``skip``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

from ..options import one_line
from .chat import Renderer, check_messages, encode_conversation, has_generation_markers, label_tokens, render_conversations, tokens_before
from .config import FORMATS, ON_ERROR
from .formats import IGNORE, NO_LABEL, DataError, encode_classification, encode_instruction, encode_text, token_blocks

PIPELINE_VERSION = 2  # part of every cache key: bump when the tokenized layout or the masks change (2: turn-anchored chat masks)
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system", "tool": "tool"}
TOKENIZED_COLUMNS = ("input_ids", "labels", "num_labels", "length", "prompt_length", "truncated", "error")


# -- sources ------------------------------------------------------------------------------------
def parse_hub(spec: str) -> tuple[str, str | None, str]:
    """``org/name:subset@split`` -> (name, subset or None, split, default "train")."""
    name, _, split = spec.partition("@")
    name, _, subset = name.partition(":")
    return name, subset or None, split or "train"


def load_source(spec: str, key: str):
    """One source as a ``datasets.Dataset`` (no tokenization yet); errors name ``key`` and ``spec``."""
    import datasets

    from . import assets

    try:
        spec = assets.resolve(spec, assets.DATASETS, key)
    except KeyError as err:
        raise DataError(err.args[0]) from None
    path = Path(spec)
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{key} {spec!r}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_BUILDERS)}")
            if builder in TEXT_BUILDERS:
                check_text_file(path)
            with quiet_datasets():
                loaded = datasets.load_dataset(builder, data_files=str(path), split="train", **BUILDER_OPTIONS.get(builder, {}))
            if len(loaded) == 0:
                raise DataError(f"{path}: no rows")
            return loaded
        if path.is_dir():
            if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                loaded = datasets.load_from_disk(str(path))
                return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
            with quiet_datasets():
                return datasets.load_dataset(str(path), split="train")
    except DataError:
        raise
    except Exception as err:  # datasets wraps parser errors in several exception types
        raise DataError(_first_bad_line(path) or f"{spec}: cannot be read as a data set: {one_line(err, innermost=True, limit=300)}") from None
    if "/" not in spec or spec.startswith((".", "/")) or Path(spec).suffix.lower() in FILE_BUILDERS:
        raise DataError(f"{key} {spec!r}: no such file or folder")
    name, subset, split = parse_hub(spec)
    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as err:
        raise DataError(
            f"{key} {spec!r} is not a local file or folder, and the hub data set {name!r} (subset {subset}, split {split!r}) "
            f"could not be loaded ({type(err).__name__}: offline, or not in the cache). Download it where the network is "
            f"reachable (`huggingface-cli download --repo-type dataset {name} --local-dir DIR`) and set {key} to DIR"
        ) from None


TEXT_BUILDERS = ("json", "csv")
BUILDER_OPTIONS = {"csv": {"keep_default_na": False}}  # an empty CSV cell is "", not NaN; "NA" stays text


def check_text_file(path: Path) -> None:
    """A JSON/JSONL/CSV file is UTF-8 and not empty; the error names the line (one streaming pass)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line, content = 1, False
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as err:
                line += chunk.count(b"\n", 0, err.start)
                raise DataError(f"{path}:{line}: not UTF-8 text ({err.reason}); re-save the file as UTF-8") from None
            line += text.count("\n")
            content = content or bool(text.strip())
    if not content:
        raise DataError(f"{path}: the file is empty: no rows")


@contextlib.contextmanager
def quiet_datasets():
    """datasets logs a parse error (with a traceback) before raising it; we raise one naming the line."""
    import datasets

    logger = datasets.logging.get_logger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_bad_line(path: Path) -> str | None:
    """``file:N: what is wrong`` for the first line of a JSONL file that is not a JSON object (its
    encoding was checked before loading, by :func:`check_text_file`)."""
    if not path.is_file() or path.suffix.lower() != ".jsonl":
        return None
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}:{number}: invalid JSON: {err.msg} (column {err.colno})"
            if not isinstance(value, dict):
                return f"{path}:{number}: each line must be a JSON object, got {type(value).__name__}"
    return None


TEXT_FIELDS = ("instruction", "input", "output", "text", "text_pair")


def text_columns_as_text(dataset):
    """A CSV reader guesses each column's type, so a column of numeric answers arrives as numbers:
    the text fields are read back as the text they were in the file."""
    from datasets import Value

    for name in TEXT_FIELDS:
        if name in dataset.column_names and getattr(dataset.features[name], "dtype", "string") != "string":
            dataset = dataset.cast_column(name, Value("string"))
    return dataset


def rename_columns(dataset, columns: dict[str, str] | None, where: str):
    """Apply ``data.columns`` ({our field: their column})."""
    if not columns:
        return dataset
    missing = [theirs for theirs in columns.values() if theirs not in dataset.column_names]
    if missing:
        raise DataError(f"{where}: data.columns names {missing[0]!r}, which is not a column; columns: {dataset.column_names}")
    return dataset.rename_columns({theirs: ours for ours, theirs in columns.items() if theirs != ours})


def required_columns(format: str) -> tuple[tuple[str, ...], ...]:
    """Alternatives of columns a format needs (one of the tuples must be present)."""
    return {
        "instruction": (("instruction", "output"),),
        "chat": (("messages",), ("conversations",)),
        "text": (("text",),),
        "classification": (("text", "label"),),
    }[format]


def check_columns(dataset, format: str, where: str) -> None:
    options = required_columns(format)
    if not any(set(option) <= set(dataset.column_names) for option in options):
        wanted = " or ".join("+".join(option) for option in options)
        raise DataError(
            f"{where}: the {format!r} format needs the column(s) {wanted}; the data has {dataset.column_names}. "
            "Rename them with data.columns (e.g. columns: {text: review})"
        )


def load_sources(specs: Sequence[str], key: str, format: str, columns: dict[str, str] | None, weights: Sequence[float] | None, seed: int):
    """Every source loaded, renamed, checked and tagged with ``_source``/``_row``; concatenated, or
    interleaved with ``weights`` (seeded; every source is seen to its end)."""
    import datasets

    parts = []
    for index, spec in enumerate(specs):
        where = f"{key}[{index}] {spec!r}" if len(specs) > 1 else f"{key} {spec!r}"
        part = rename_columns(load_source(spec, key), columns, where)
        check_columns(part, format, where)
        if Path(spec).suffix.lower() == ".csv":
            part = text_columns_as_text(part)
        part = part.add_column("_row", list(range(1, len(part) + 1)))
        parts.append(part.add_column("_source", [index] * len(part)))
    if len(parts) == 1:
        return parts[0]
    if weights is None:
        return datasets.concatenate_datasets(parts)
    total = float(sum(weights))
    return datasets.interleave_datasets(parts, probabilities=[w / total for w in weights], seed=seed, stopping_strategy="all_exhausted")


# -- tokenization -------------------------------------------------------------------------------
def sharegpt_messages(conversation, where: str) -> list[dict]:
    """ShareGPT ``[{from, value}]`` -> ``[{role, content}]``."""
    if not isinstance(conversation, list):
        raise DataError(f"{where}: 'conversations' must be a list of {{from, value}}")
    messages = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{i}] must have 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise DataError(f"{where}: conversations[{i}].from is {turn['from']!r}; expected one of {sorted(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


class Encoder:
    """The ``Dataset.map`` function: a batch of rows in, the tokenized columns out (never raises;
    a bad row gets its message in ``error`` and is dropped or reported afterwards)."""

    def __init__(self, tokenizer, format: str, max_length: int, sources: Sequence[str], label_names=None, mask_history: bool = False,
                 num_labels: int | None = None):  # fmt: skip
        self.tokenizer, self.format, self.max_length = tokenizer, format, max_length
        self.sources, self.label_names, self.mask_history, self.num_labels = list(sources), label_names, mask_history, num_labels
        self.regression = format == "classification" and num_labels == 1
        self.renderer = None  # built on first use, in the worker that uses it

    def __getstate__(self):
        return {**self.__dict__, "renderer": None}

    def features(self):
        """The column types of the output (fixed, so that every batch and worker writes the same)."""
        from datasets import Features, Sequence, Value

        label = "float64" if self.regression else "int64" if self.format == "classification" else "int32"
        return Features({
            "input_ids": Sequence(Value("int32")), "labels": Sequence(Value(label)), "num_labels": Value("int32"),
            "length": Value("int32"), "prompt_length": Value("int32"), "truncated": Value("bool"), "error": Value("string"),
            "_source": Value("int64"), "_row": Value("int64"),
        })  # fmt: skip

    def messages(self, row: dict, where: str) -> list[dict]:
        messages = row.get("messages")
        if messages is None and row.get("conversations") is not None:
            messages = sharegpt_messages(row["conversations"], where)
        return check_messages(messages, where)

    def encode(self, row: dict, where: str) -> dict:
        if self.format == "chat":
            return encode_conversation(self.messages(row, where), self.tokenizer, where, self.mask_history)
        if self.format == "instruction":
            return encode_instruction(row, self.tokenizer, where)
        if self.format == "text":
            return encode_text(row, self.tokenizer, where)
        return encode_classification(row, self.tokenizer, where, self.label_names, self.num_labels)

    def encode_chats(self, rows: list[dict], wheres: list[str]) -> list[dict | DataError]:
        """Chat rows rendered and their turns located in batches, tokenized in one call (offsets give the labels)."""
        conversations: list = []
        for row, where in zip(rows, wheres):
            try:
                conversations.append(self.messages(row, where))
            except DataError as err:
                conversations.append(err)
        valid = [i for i, c in enumerate(conversations) if not isinstance(c, DataError)]
        if self.renderer is None and valid:
            try:
                self.renderer = Renderer(self.tokenizer)
            except DataError as err:  # no chat template: every well-formed row says so
                return [c if isinstance(c, DataError) else DataError(f"{where}: {err}") for c, where in zip(conversations, wheres)]
        located = render_conversations([conversations[i] for i in valid], self.renderer, [wheres[i] for i in valid])
        for i, result in zip(valid, located):
            conversations[i] = result
        good = [c for c in conversations if not isinstance(c, DataError)]
        texts = [c.text for c in good]
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else {"input_ids": [], "offset_mapping": []}
        results, k = [], 0
        for c in conversations:
            if isinstance(c, DataError):
                results.append(c)
                continue
            ids, offsets = encoded["input_ids"][k], encoded["offset_mapping"][k]
            results.append({"input_ids": ids, "labels": label_tokens(ids, offsets, c.spans, self.mask_history),
                            "prompt_length": tokens_before(offsets, c.prompt_end)})  # fmt: skip
            k += 1
        return results

    def __call__(self, batch: dict) -> dict:
        names = [c for c in batch if not c.startswith("_")]
        rows = [{name: batch[name][i] for name in names} for i in range(len(batch["_row"]))]
        wheres = [f"{self.sources[source]}:row {row}" for source, row in zip(batch["_source"], batch["_row"])]
        if self.format == "chat" and not has_generation_markers(self.tokenizer):
            results = self.encode_chats(rows, wheres)
        else:
            results = []
            for row, where in zip(rows, wheres):
                try:
                    results.append(self.encode(row, where))
                except DataError as err:
                    results.append(err)
        out = {name: [] for name in TOKENIZED_COLUMNS}
        for result, where in zip(results, wheres):
            ids, labels, count, error, prompt, truncated = [], [], 0, None, 0, False
            if isinstance(result, DataError):
                error = str(result)
            else:
                truncated = len(result["input_ids"]) > self.max_length
                ids, labels, prompt = result["input_ids"][: self.max_length], result["labels"], result.get("prompt_length", 0)
                if isinstance(labels, list):
                    labels = labels[: self.max_length]
                    count = len(labels) - labels.count(IGNORE)
                    if count == 0:
                        ids, labels, error = [], [], f"{where}: no labelled token left after truncation to max_length={self.max_length}, so {NO_LABEL}"
                else:
                    labels, count = [labels], 1
            if error is not None and self.format == "classification":
                labels = [0.0 if self.regression else 0]
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["num_labels"].append(count)
            out["length"].append(len(ids))
            out["prompt_length"].append(min(prompt, len(ids)))
            out["truncated"].append(truncated)
            out["error"].append(error)
        return out


def label_names_of(dataset, format: str, where: str = "the data") -> list[str] | None:
    """Sorted class names when the labels are text; None when they are numbers."""
    if format != "classification" or "label" not in dataset.column_names:
        return None
    kind = getattr(dataset.features["label"], "dtype", None)
    if kind not in ("string", "large_string", "bool") and not str(kind).startswith(("int", "uint", "float")):
        raise DataError(f"{where}: the 'label' column mixes kinds of values (class names and numbers?): "
                        "give every row the same kind")  # fmt: skip
    values = dataset.unique("label")
    names = sorted(v for v in values if isinstance(v, str))
    return names or None


def check_label_count(raw, label_names: list[str] | None, num_labels: int | None, where: str) -> None:
    """model.num_labels against the labels: no implicit switch to regression, no class name beyond it."""
    if num_labels == 1 and label_names:
        raise DataError(f"model.num_labels: 1 trains a regression, but the labels of {where} are class names {label_names[:5]}")
    if num_labels is not None and label_names and len(label_names) > num_labels:
        raise DataError(f"model.num_labels: {num_labels}, but {where} has {len(label_names)} labels: {label_names[:10]}")
    dtype = str(getattr(raw.features.get("label"), "dtype", ""))
    if num_labels is None and not label_names and dtype.startswith("float"):
        raise DataError(
            f"model.num_labels: the labels of {where} are numbers with a fraction: set model.num_labels: 1 to train a regression, "
            "or give class ids (integers) or class names"
        )


def warn_single_class(raw, label_names: list[str] | None, num_labels: int | None, where: str) -> None:
    """One line when every row of a classification set has the same label (nothing to tell apart)."""
    if num_labels == 1:
        return
    classes = label_names if label_names else raw.unique("label")
    if len(classes) == 1:
        print(f"warning: {where}: every row has the label {classes[0]!r}; a classifier trained on one class learns nothing", flush=True)


def tokenize(dataset, encoder: Encoder, num_proc: int | None = None):
    """``dataset`` mapped through ``encoder`` in batches (``num_proc`` workers), keeping only the
    tokenized columns (and ``_source``/``_row`` for error messages)."""
    drop = [c for c in dataset.column_names if c not in ("_source", "_row")]
    workers = num_proc if num_proc and num_proc > 1 and len(dataset) >= 2000 else None
    return dataset.map(encoder, batched=True, batch_size=500, num_proc=workers, remove_columns=drop, desc="tokenize",
                       features=encoder.features(), load_from_cache_file=False)  # fmt: skip


# -- fingerprints and the on-disk cache -----------------------------------------------------------
def file_digest(path: Path, digest) -> None:
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 22), b""):
            digest.update(block)


def source_digest(spec: str, digest) -> None:
    """Content of a local file or folder; name, subset, split and cache fingerprint of a hub set."""
    from . import assets

    try:
        spec = assets.resolve(spec, assets.DATASETS, "data.train_file")
    except KeyError:
        pass
    path = Path(spec)
    if path.is_file():
        file_digest(path, digest)
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode())
            file_digest(file, digest)
    else:
        digest.update(spec.encode())


def tokenizer_digest(tokenizer, digest) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(type(tokenizer).__name__.encode())
    digest.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())


def cache_key(specs: Sequence[str], tokenizer, settings: dict) -> str:
    """A fingerprint of what the tokenized set depends on: sources' content, tokenizer, settings."""
    digest = hashlib.sha256(f"sora_dist-data-v{PIPELINE_VERSION}".encode())
    for spec in specs:
        source_digest(spec, digest)
    tokenizer_digest(tokenizer, digest)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def tokenized_cache_dir() -> Path:
    from .assets import cache_dir

    return Path(os.environ.get("SORA_DIST_DATA_CACHE") or cache_dir() / "tokenized")


# -- the prepared split ----------------------------------------------------------------------------
class Examples:
    """A tokenized split: rows addressed by index (``input_ids``, ``attention_mask``, ``labels``), Arrow-backed,
    plus what was dropped (``skipped``: the first ``source:row`` -> reason, ``skipped_count`` all of
    them) and the class names of a classification set."""

    def __init__(self, dataset, format: str, skipped: dict[str, str] | None = None, label_names: list[str] | None = None,
                 skipped_count: int | None = None, counts: dict[str, int] | None = None):  # fmt: skip
        self.dataset, self.format, self.skipped, self.label_names = dataset, format, dict(skipped or {}), label_names
        self.skipped_count = len(self.skipped) if skipped_count is None else skipped_count
        self.counts = dict(counts or {})  # of the whole source: truncated rows, rows with no label
        self._prompts = "prompt_length" in dataset.column_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.dataset[int(index)]
        labels = row["labels"][0] if self.format == "classification" else row["labels"]
        example = {"input_ids": row["input_ids"], "attention_mask": [1] * len(row["input_ids"]), "labels": labels}
        if self._prompts:
            example["prompt_length"] = row["prompt_length"]  # the tokens a model is given to produce the last answer
        return example

    @property
    def rows(self) -> list[dict]:
        """Every example as a dict (materialized: for small sets)."""
        return self[:]

    @property
    def lengths(self) -> list[int]:
        return list(self.dataset["length"])

    def select(self, indices) -> Examples:
        return Examples(self.dataset.select(indices), self.format, self.skipped, self.label_names, self.skipped_count, self.counts)

    @property
    def stats(self) -> dict[str, int]:
        """rows, tokens and labelled tokens of these rows; rows truncated, rows dropped for having no
        label and all rows dropped, of the source they came from."""
        import pyarrow.compute as pc

        columns = [c for c in ("length", "num_labels") if c in self.dataset.column_names]
        table = self.dataset.select_columns(columns).with_format("arrow")[:] if len(self.dataset) else None
        tokens = int(pc.sum(table.column("length")).as_py() or 0) if table is not None else 0
        if self.format == "classification" or table is None or "num_labels" not in table.column_names:
            labelled = len(self) if self.format == "classification" else tokens
        else:
            labelled = int(pc.sum(table.column("num_labels")).as_py() or 0)
        return {"rows": len(self), "tokens": tokens, "labelled_tokens": labelled, "truncated": self.counts.get("truncated", 0),
                "no_label": self.counts.get("no_label", 0), "skipped": self.skipped_count}  # fmt: skip


MAX_REPORTED = 20  # skipped rows kept with their reason (all are counted)
META_NAME = "sora_data.json"


def prepare_split(
    specs: Sequence[str],
    key: str,
    tokenizer,
    format: str,
    max_length: int,
    on_error: str = "fail",
    label_names: list[str] | None = None,
    columns: dict[str, str] | None = None,
    weights: Sequence[float] | None = None,
    mask_history: bool = False,
    seed: int = 0,
    num_proc: int | None = None,
    cache: bool = True,
    num_labels: int | None = None,
) -> Examples:
    """Load, tokenize and filter the sources ``specs`` (the config key ``key``); with ``cache``
    the result is kept under its fingerprint and the next call with the same inputs loads it.
    Classification: ``num_labels`` (model.num_labels) 1 is regression; labels are checked against it."""
    import datasets

    from ..deploy.atomic import write_folder

    specs = list(specs)
    settings = {"format": format, "max_length": max_length, "on_error": on_error, "label_names": label_names,
                "columns": columns, "weights": weights, "seed": seed if weights else None, "mask_history": mask_history,
                "num_labels": num_labels}  # fmt: skip
    folder = tokenized_cache_dir() / cache_key(specs, tokenizer, settings) if cache else None
    if folder is not None and (folder / META_NAME).is_file():
        return _load_cached(folder)
    raw = load_sources(specs, key, format, columns, weights, seed)
    label_names = label_names or label_names_of(raw, format, f"{key} {', '.join(specs)}")
    if format == "classification":
        check_label_count(raw, label_names, num_labels, f"{key} {', '.join(specs)}")
        warn_single_class(raw, label_names, num_labels, f"{key} {', '.join(specs)}")
    encoder = Encoder(tokenizer, format, max_length, specs, label_names, mask_history, num_labels)
    tokenized = tokenize(raw, encoder, num_proc)
    errors = tokenized.data.column("error").to_pylist()  # one Arrow conversion (iterating the column is slow)
    bad = [i for i, error in enumerate(errors) if error is not None]
    if bad and on_error == "fail":
        raise DataError(errors[bad[0]])
    skipped = {error.split(": ", 1)[0]: error.split(": ", 1)[-1] for error in (errors[i] for i in bad[:MAX_REPORTED])}
    counts = {"truncated": sum(flag and error is None for flag, error in zip(tokenized.data.column("truncated").to_pylist(), errors)),
              "no_label": sum(NO_LABEL in errors[i] for i in bad)}  # fmt: skip
    good = tokenized.remove_columns(["error", "_source", "_row", "truncated"])
    if format not in ("chat", "instruction"):
        good = good.remove_columns(["prompt_length"])
    if bad:
        good = good.select([i for i, error in enumerate(errors) if error is None])
    if len(good) == 0:
        raise DataError(f"{key} {', '.join(specs)}: no usable rows ({len(bad)} skipped; first: {errors[bad[0]] if bad else 'none'})")
    meta = {"format": format, "skipped": skipped, "skipped_count": len(bad), "label_names": label_names, "sources": specs, "counts": counts}
    if folder is None:
        return Examples(good, format, skipped, label_names, len(bad), counts)

    def fill(tmp: Path) -> None:
        good.save_to_disk(str(tmp))
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1))

    write_folder(folder, fill, replace=False)
    datasets.disable_progress_bars()
    try:
        return _load_cached(folder)
    finally:
        datasets.enable_progress_bars()


def _load_cached(folder: Path) -> Examples:
    import datasets

    meta = json.loads((folder / META_NAME).read_text())
    dataset = datasets.load_from_disk(str(folder))  # memory-mapped Arrow files
    return Examples(dataset, meta["format"], meta["skipped"], meta["label_names"], meta["skipped_count"], meta.get("counts"))


# -- the library entry points --------------------------------------------------------------------
def data_path(path: str, key: str) -> str:
    """A data file's path; ``asset:NAME`` names a data set that installs offline (sora_dist.data.assets.DATASETS)."""
    from . import assets

    try:
        return assets.resolve(path, assets.DATASETS, key)
    except KeyError as err:
        raise DataError(err.args[0]) from None


def tokenize_file(
    path: str | Path,
    tokenizer,
    format: str,
    max_length: int,
    on_error: str = "fail",
    label_names: list[str] | None = None,
    mask_history: bool = False,
) -> Examples:
    """Read and tokenize one source (no on-disk cache); sequences longer than ``max_length`` are truncated."""
    if format not in FORMATS:
        raise DataError(f"data format must be one of {FORMATS}, got {format!r}")
    if on_error not in ON_ERROR:
        raise DataError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if format == "blocks":
        return blocks_examples(path, tokenizer, max_length)
    return prepare_split([str(path)], "data.train_file", tokenizer, format, max_length, on_error, label_names,
                         mask_history=mask_history, cache=False)  # fmt: skip


def blocks_examples(path: str | Path, tokenizer, block_len: int) -> Examples:
    """The ``blocks`` format as Examples (one row per block, loss on every token)."""
    import datasets

    blocks = read_token_blocks(path, block_len, tokenizer)
    ids = [block["input_ids"].tolist() for block in blocks]
    table = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "length": [len(b) for b in ids]})
    return Examples(table, "blocks")


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
                if not record["text"].strip():
                    continue  # an empty document adds nothing to the stream
                ids.extend(encode_text(record, tokenizer, f"{path}:{number}")["input_ids"])
            else:
                raise DataError(f'{path}:{number}: each line needs "input_ids" (or "text", given a tokenizer)')
    return token_blocks(ids, seq_len, str(path))


def split_holdout(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """A seeded random split into (train, validation) with ``fraction`` held out."""
    import torch

    if not 0 < fraction < 1:
        raise DataError(f"validation_fraction must be in (0, 1), got {fraction}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(fraction * len(examples))))
    if n_val >= len(examples):
        raise DataError(f"data.validation_fraction: {fraction} of {len(examples)} usable rows leaves no training row")
    held_out = examples.select(order[:n_val])
    held_out.skipped, held_out.skipped_count, held_out.counts = {}, 0, {}  # the file's dropped rows are counted once, with the training part
    return examples.select(order[n_val:]), held_out
