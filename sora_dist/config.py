"""The run configuration of ``sora-train``: one YAML file, validated before anything heavy starts.

Sections: ``model``, ``sora``, ``data``, ``train``. Each maps onto a dataclass; an unknown key, a
wrong type or an impossible value fails with the key's path (``train.lr``) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .data import FORMATS
from .inject import SoRAConfig
from .train import TrainConfig

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration mistake; the message starts with the key's path."""


@dataclasses.dataclass
class ModelConfig:
    path: str = ""
    task: str = "causal_lm"
    dtype: str = "bfloat16"
    quantization: str = "none"
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "bfloat16"
    num_labels: int | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    def __post_init__(self):
        _choice("task", self.task, ("causal_lm", "sequence_classification"))
        _choice("dtype", self.dtype, DTYPES)
        _choice("quantization", self.quantization, ("none", "4bit", "8bit"))
        _choice("bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        _choice("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, DTYPES)
        if not self.path:
            raise ValueError("path: required: a local model folder or a hub id")


@dataclasses.dataclass
class DataConfig:
    format: str = "instruction"
    train_file: str = ""
    validation_file: str | None = None
    validation_fraction: float = 0.0
    max_length: int = 512
    on_error: str = "fail"

    def __post_init__(self):
        _choice("format", self.format, FORMATS)
        _choice("on_error", self.on_error, ("fail", "skip"))
        if not self.train_file:
            raise ValueError("train_file: required: a local .jsonl, .json, .csv or .parquet file")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction: must be in [0, 1), got {self.validation_fraction}")
        if self.validation_file and self.validation_fraction:
            raise ValueError("validation_fraction: give either validation_file or validation_fraction, not both")
        if self.max_length < 8:
            raise ValueError(f"max_length: must be >= 8, got {self.max_length}")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: must be one of {list(allowed)}, got {value!r}")


SECTIONS: dict[str, type] = {"model": ModelConfig, "sora": SoRAConfig, "data": DataConfig, "train": TrainConfig}


@dataclasses.dataclass
class RunConfig:
    model: ModelConfig
    sora: SoRAConfig
    data: DataConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


def _check_type(path: str, value: Any, annotation) -> Any:
    """``value`` converted to the field's type, or a ConfigError naming ``path``."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else (annotation,)
    if value is None and type(None) in options:
        return None
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str) and _is_number(value):
            return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        if origin is str and isinstance(value, str):
            return value
        if origin is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{path}: expected {names}, got {type(value).__name__} {value!r}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_section(name: str, values: dict | None):
    cls = SECTIONS[name]
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown key; allowed keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    typed = {key: _check_type(f"{name}.{key}", value, hints[key]) for key, value in values.items()}
    try:
        return cls(**typed)
    except ValueError as err:
        message = str(err)
        for prefix in (f"{cls.__name__}.", "SoRAConfig.", "TrainConfig."):
            message = message.replace(prefix, "")
        raise ConfigError(f"{name}.{message}") from None


def set_override(raw: dict, assignment: str) -> None:
    """Apply ``section.key=value`` (value parsed as YAML) to the raw config mapping."""
    key, sep, text = assignment.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value, e.g. train.lr=1e-4")
    section, _, field = key.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"--set {key}: unknown section {section!r}; sections: {', '.join(SECTIONS)}")
    raw.setdefault(section, {})
    if raw[section] is None:
        raw[section] = {}
    raw[section][field] = yaml.safe_load(text)


def load_config(path: str | Path | None = None, overrides: list[str] = (), raw: dict | None = None) -> RunConfig:
    """Read, override and validate a run configuration."""
    if raw is None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with sections {', '.join(SECTIONS)}")
    for assignment in overrides:
        set_override(raw, assignment)
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown section; sections: {', '.join(SECTIONS)}")
    return RunConfig(**{name: build_section(name, raw.get(name)) for name in SECTIONS})
