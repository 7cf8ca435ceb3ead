"""The ``data`` section of a run and the vocabularies of data formats."""

from __future__ import annotations

import dataclasses

from ..options import ConfigError, choice, option

FORMATS = ("instruction", "chat", "text", "classification", "blocks")
ON_ERROR = ("fail", "skip")


@dataclasses.dataclass
class DataConfig:
    format: str = option(
        "instruction",
        "instruction (alpaca: instruction, input, output) | chat (messages, or ShareGPT conversations) | text | "
        "classification (text, text_pair, label) | blocks (text or input_ids cut into max_length blocks)",
    )
    train_file: str | list[str] = option(
        "",
        "a local .jsonl/.json/.csv/.parquet/.arrow file, a folder (Dataset.save_to_disk, or of data files), a hub data set "
        "org/name[:subset][@split], asset:rotten_tomatoes | asset:vitaminc | asset:movie_dialog; or a list of them",
    )
    train_weights: list[float] | None = option(
        None, "one weight per train_file: interleave the sources with these sampling weights (seeded) instead of concatenating"
    )
    columns: dict[str, str] | None = option(None, "rename columns: {our field: your column}, e.g. {text: review, label: sentiment}")
    validation_file: str | None = option(None, "optional validation data of the same format (any source train_file accepts)")
    validation_fraction: float = option(0.0, "hold out this fraction of train_file for validation instead (seeded by train.seed)")
    max_length: int = option(512, "truncate examples to this many tokens (packing: the packed row length; blocks: the block length)")
    mask_history: bool = option(False, "chat: train on the last assistant turn only (earlier turns are context)")
    packing: bool = option(False, "pack several examples into each max_length row (causal LM); attention never crosses examples")
    group_by_length: bool = option(False, "without packing: batch examples of similar length together (less padding)")
    on_error: str = option("fail", "fail (default: stop at the first malformed row, naming source and row) | skip (count and skip)")
    num_proc: int = option(0, "processes that tokenize (0 = up to 8, one per CPU core)")
    cache: bool = option(True, "keep the tokenized set on disk under a fingerprint of its inputs ($SORA_DIST_CACHE/tokenized)")
    eval_batch_size: int = option(16, "batch size of evaluation")
    eval_max_examples: int = option(0, "evaluate on at most this many validation examples (0 = all)")
    eval_generate_tokens: int = option(
        0, "instruction/chat data: also greedily generate this many tokens and report how often they start with the reference answer"
    )

    def __post_init__(self):
        choice("format", self.format, FORMATS)
        choice("on_error", self.on_error, ON_ERROR)
        if isinstance(self.train_file, list):
            if not self.train_file or not all(self.train_file):
                raise ConfigError("train_file: a list of sources must not be empty or hold empty entries")
        elif not self.train_file:
            raise ConfigError("train_file: required: a local file or folder, a hub data set, or a list of them")
        if self.train_weights is not None:
            if len(self.train_weights) != len(self.sources):
                raise ConfigError(f"train_weights: one weight per train_file entry ({len(self.sources)}), got {len(self.train_weights)}")
            if any(not w > 0 for w in self.train_weights):
                raise ConfigError(f"train_weights: must be > 0, got {self.train_weights}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction: must be in [0, 1), got {self.validation_fraction}")
        if self.validation_file and self.validation_fraction:
            raise ConfigError("validation_fraction: give either validation_file or validation_fraction, not both")
        if self.max_length < 8:
            raise ConfigError(f"max_length: must be >= 8, got {self.max_length}")
        if self.packing and self.format in ("classification", "blocks"):
            raise ConfigError(f"packing: applies to causal LM formats, not format {self.format!r}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size: must be >= 1, got {self.eval_batch_size}")
        for key in ("eval_max_examples", "eval_generate_tokens", "num_proc"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")

    @property
    def sources(self) -> list[str]:
        return self.train_file if isinstance(self.train_file, list) else [self.train_file]
