"""The run configuration of ``sora-train``: one YAML file, validated before anything heavy starts.

Sections: ``model``, ``sora``, ``data``, ``train``, ``distributed``, and two optional ones:
``sparsity_schedule`` (the staged Algorithm 1 of SORA.md) or ``sparsity_budget`` (a λ controller
towards a target live rank or parameter count). Each maps onto a dataclass; an unknown key, a wrong
type or an impossible value fails with the key's path (``train.lr``) and what is allowed.
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
from .stages import SparsitySchedule
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
    eval_batch_size: int = 16
    eval_max_examples: int = 0
    eval_generate_tokens: int = 0

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


@dataclasses.dataclass
class DistributedConfig:
    deepspeed_config: str | None = None
    mixed_precision: str | None = None

    def __post_init__(self):
        if self.mixed_precision is not None:
            _choice("mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise ValueError(f"deepspeed_config: file {self.deepspeed_config!r} not found (see ds_configs/)")


@dataclasses.dataclass
class SparsityBudget:
    """Budget mode (budget.py): λ is chosen at every step so the live adapter follows a planned size to a target."""

    target_rank: float | None = None
    target_params: int | None = None
    by_step: int = 0
    lambda_max: float = 2.0
    trajectory: str = "cubic"

    def __post_init__(self):
        if (self.target_rank is None) == (self.target_params is None):
            raise ValueError("target_rank: give exactly one of target_rank (average live rank per module) or target_params")
        if self.target_rank is not None and self.target_rank < 0:
            raise ValueError(f"target_rank: must be >= 0, got {self.target_rank}")
        if self.target_params is not None and self.target_params < 0:
            raise ValueError(f"target_params: must be >= 0, got {self.target_params}")
        if self.by_step < 1:
            raise ValueError(f"by_step: required: the optimizer step by which to reach the target (>= 1), got {self.by_step}")
        if not 0 < self.lambda_max <= 10:
            raise ValueError(f"lambda_max: must be in (0, 10] (prox_adam + lr_scaled: 1.5-3), got {self.lambda_max}")
        _choice("trajectory", self.trajectory, ("cubic", "linear"))


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: must be one of {list(allowed)}, got {value!r}")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "sora": SoRAConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "distributed": DistributedConfig,
    "sparsity_schedule": SparsitySchedule,
    "sparsity_budget": SparsityBudget,
}
# Sections that exist only when the YAML has them (None otherwise).
OPTIONAL_SECTIONS = ("sparsity_schedule", "sparsity_budget")

HELP: dict[str, str] = {
    "model.path": "local model folder or hub id (offline: the files must be local or cached)",
    "model.task": "causal_lm | sequence_classification",
    "model.dtype": "dtype of the base weights: float32 | bfloat16 | float16",
    "model.quantization": "none | 4bit | 8bit (bitsandbytes; 4-bit storage uses model.dtype, as ZeRO-3 needs)",
    "model.bnb_4bit_quant_type": "nf4 | fp4",
    "model.bnb_4bit_double_quant": "quantize the 4-bit scales too (QLoRA's double quantization)",
    "model.bnb_4bit_compute_dtype": "dtype the 4-bit layers compute in",
    "model.num_labels": "classes of a sequence classifier (default: from the data's labels; 1 = regression)",
    "model.gradient_checkpointing": "recompute activations in backward to save memory",
    "model.trust_remote_code": "allow the model folder's own Python code (off unless you trust it)",
    "sora.r": "r_max: rank of each SoRA branch before sparsification",
    "sora.alpha": "scale s = alpha / r_max (fixed; pruning does not change it)",
    "sora.dropout": "dropout on the branch input",
    "sora.target_modules": '"all-linear" (except the output head), a regex on full names, or a list of name suffixes',
    "sora.gate_init": "normal (N(0,1), as the released code) | ones",
    "sora.modules_to_save": "modules trained in full, e.g. [score] for a classifier head (default for classification: the head)",
    "sora.adapter_dtype": "dtype of the adapter parameters (float32 recommended)",
    "data.format": "instruction | chat | text | classification",
    "data.train_file": "local .jsonl, .json, .csv or .parquet, or asset:rotten_tomatoes | asset:vitaminc | asset:movie_dialog "
    "(real data that install offline, in the classification shape)",
    "data.validation_file": "optional validation file of the same format",
    "data.validation_fraction": "hold out this fraction of train_file for validation instead (seeded by train.seed)",
    "data.max_length": "truncate examples to this many tokens",
    "data.on_error": "fail (default: stop at the first malformed row, naming file and row) | skip (count and skip)",
    "data.eval_batch_size": "batch size of evaluation",
    "data.eval_max_examples": "evaluate on at most this many validation examples (0 = all)",
    "data.eval_generate_tokens": "instruction/chat data: also greedily generate this many tokens and report how often they start with the reference answer",
    "train.steps": "optimizer steps (not micro-batches)",
    "train.micro_batch_size": "examples per micro-batch per process",
    "train.grad_accum": "micro-batches per optimizer step; global batch = micro_batch_size x grad_accum x processes",
    "train.lr": "peak learning rate of A, B (and modules_to_save)",
    "train.gate_lr": "peak learning rate of the gates (default: train.lr; in budget mode one chosen from the budget, see sparsity_budget.lambda_max)",
    "train.weight_decay": "AdamW weight decay of A and B (never the gates)",
    "train.warmup_steps": "linear warm-up steps of both learning rates",
    "train.lr_decay": "constant | linear | cosine decay after warm-up",
    "train.max_grad_norm": "global gradient-norm clipping (0 = off)",
    "train.gate_update": "prox_adam (released code) | prox_sgd (paper)",
    "train.threshold": "lr_scaled (tau = lr x lambda, the paper) | fixed (tau = lambda)",
    "train.lambda_kind": "constant | linear | geometric ramp of lambda",
    "train.lambda_start": "sparsity strength lambda at step 0 (prox_adam + lr_scaled: lambda > 1 eventually kills every gate)",
    "train.lambda_end": "lambda at the end of the ramp",
    "train.lambda_steps": "optimizer steps of the ramp",
    "train.seed": "seed of the adapters, data order and dropout",
    "train.output_dir": "where checkpoints, metrics.jsonl, the adapter and the reports go (under runs/)",
    "train.save_every": "checkpoint every N steps (0 = never); written atomically",
    "train.keep_checkpoints": "how many checkpoints to keep",
    "train.resume": "continue from the newest checkpoint in output_dir if there is one",
    "train.log_every": "log loss, lr, lambda and live ranks every N steps",
    "train.eval_every": "evaluate every N steps (0 = only at the end)",
    "distributed.deepspeed_config": "DeepSpeed JSON (ds_configs/) when launching with torchrun/deepspeed; accelerate launch passes its own",
    "distributed.mixed_precision": "no | bf16 | fp16 (fp16 needs a GPU); default: the launcher's setting",
    "sparsity_schedule.kind": "linear | geometric (stages lambdas from start to end) | list (the lambdas in values); "
    "present, this section runs the stages instead of one training run (train.lambda_* are then unused)",
    "sparsity_schedule.start": "lambda of the first stage (linear | geometric; > 0 for geometric)",
    "sparsity_schedule.end": "lambda of the last stage (>= start)",
    "sparsity_schedule.stages": "number of stages K (linear | geometric)",
    "sparsity_schedule.values": "kind=list: the non-decreasing lambdas, one per stage, e.g. [0.1, 0.3, 1.0]",
    "sparsity_schedule.steps_per_stage": "optimizer steps of each stage, each with its own warm-up/decay of the lr (default: train.steps)",
    "sparsity_schedule.train_subset": "memorization is scored on the first N training examples",
    "sparsity_budget.target_rank": "budget as the average live rank per SoRA module (0..sora.r); present, this section "
    "sets lambda during training (train.lambda_* are then unused); give this or target_params",
    "sparsity_budget.target_params": "budget as the number of non-zero adapter parameters (sum of live rank x (d_in + d_out))",
    "sparsity_budget.by_step": "optimizer step by which the live count should reach the target (<= train.steps); held afterwards",
    "sparsity_budget.lambda_max": "largest lambda of any step, i.e. the fastest shrinkage (prox_adam + lr_scaled: > 1, 1.5-3); "
    "without train.gate_lr, the gate lr is chosen so that this lambda can prune in time",
    "sparsity_budget.trajectory": "planned decrease from the start count to the target: cubic (fast first, AdaLoRA-style) | linear",
    "sparsity_schedule.compact": "remove the dead ranks (gates exactly 0) physically between stages, so later stages "
    "train a smaller adapter (a removed rank cannot revive); stages.csv gets adapter_params and step_time_s",
}


def config_help() -> str:
    """Every key of every section with its default and meaning."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} (default {default!r}): {HELP.get(f'{name}.{f.name}', '')}")
    return "\n".join(lines)


@dataclasses.dataclass
class RunConfig:
    model: ModelConfig
    sora: SoRAConfig
    data: DataConfig
    train: TrainConfig
    distributed: DistributedConfig
    sparsity_schedule: SparsitySchedule | None = None
    sparsity_budget: SparsityBudget | None = None

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS if getattr(self, name) is not None}


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
        item = (typing.get_args(option) or (str,))[0]
        if origin is list and isinstance(value, list) and item is str and all(isinstance(v, str) for v in value):
            return value
        if origin is list and isinstance(value, list) and item is float and all(_is_real(v) for v in value):
            return [float(v) for v in value]
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{path}: expected {names}, got {type(value).__name__} {value!r}")


def _is_real(value: Any) -> bool:
    """An int or float from YAML, or a string such as 3e-4 that YAML 1.1 did not read as a number."""
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (isinstance(value, str) and _is_number(value))


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
    sections = {name: build_section(name, raw.get(name)) for name in SECTIONS if name in raw or name not in OPTIONAL_SECTIONS}
    config = RunConfig(**sections)
    if config.sparsity_schedule is not None:
        check_stages(config)
    if config.sparsity_budget is not None:
        check_budget(config)
    return config


def check_budget(config: RunConfig) -> None:
    """Budget mode against the other sections: one way of choosing lambda, a reachable target."""
    budget = config.sparsity_budget
    if config.sparsity_schedule is not None:
        raise ConfigError("sparsity_budget: cannot be combined with sparsity_schedule (both choose lambda): keep one")
    if budget.by_step > config.train.steps:
        raise ConfigError(f"sparsity_budget.by_step: must be <= train.steps={config.train.steps}, got {budget.by_step}")
    if budget.target_rank is not None and budget.target_rank > config.sora.r:
        raise ConfigError(f"sparsity_budget.target_rank: must be <= sora.r={config.sora.r}, got {budget.target_rank}")
    if config.train.gate_update == "prox_adam" and config.train.threshold == "lr_scaled" and budget.lambda_max <= 1:
        raise ConfigError(
            f"sparsity_budget.lambda_max: must be > 1 with prox_adam and the lr_scaled threshold, got {budget.lambda_max}: "
            "an Adam step moves a gate by about the learning rate, so only lambda > 1 can shrink every gate"
        )


def check_stages(config: RunConfig) -> None:
    """What the staged run needs beyond its own section: validation data and a valid stage length."""
    if not (config.data.validation_file or config.data.validation_fraction):
        raise ConfigError(
            "sparsity_schedule: the generalization curve needs validation data: "
            "set data.validation_file or data.validation_fraction"
        )
    schedule = config.sparsity_schedule
    try:
        schedule.stage_config(config.train, 0, schedule.lambdas()[0], "")
    except ValueError as err:
        message = str(err).replace("TrainConfig.", "train.").replace("steps=", "sparsity_schedule.steps_per_stage=")
        raise ConfigError(f"sparsity_schedule.steps_per_stage: each stage is one training run: {message}") from None
