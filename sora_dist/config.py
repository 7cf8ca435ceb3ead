"""The run configuration of ``sora-train``: one YAML file, validated before anything heavy starts.

Sections: ``model``, ``sora``, ``data``, ``train``, ``distributed``, and two optional ones:
``sparsity_schedule`` (the staged Algorithm 1) or ``sparsity_budget`` (budget mode). Each maps
onto a dataclass defined next to the code it configures, whose fields carry their help text
(``sora-train --help`` is generated from them). An unknown key, a duplicate key, a wrong type or an
impossible value fails with the key's path (``train.lr``) and what is allowed. This module and the
section modules import nothing heavy: no torch model, tokenizer or data is touched here.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .backends.accelerate import launch_ds_config, offloads_optimizer
from .backends.dtypes import LONG_NAMES, MIXED_PRECISIONS
from .backends.optimizers import check_optimizer
from .core.config import GATE_UPDATES, SoRAConfig
from .data.config import DataConfig
from .deploy.atomic import file_in_the_way
from .options import ConfigError, choice, help_of, option
from .sparsity.config import SparsityBudget, SparsitySchedule
from .training.config import TrainConfig
from .training.trackers import check_trackers

TASKS = ("causal_lm", "sequence_classification")


@dataclasses.dataclass
class ModelConfig:
    path: str = option("", "local model folder, hub id (offline: the files must be local or cached) or asset:NAME")
    task: str = option("causal_lm", "causal_lm | sequence_classification")
    dtype: str = option("bfloat16", "dtype of the base weights: float32 | bfloat16 | float16")
    quantization: str = option("none", "none | 4bit | 8bit (bitsandbytes; 4-bit storage uses model.dtype, as ZeRO-3 needs)")
    bnb_4bit_quant_type: str = option("nf4", "nf4 | fp4")
    bnb_4bit_double_quant: bool = option(True, "quantize the 4-bit scales too (QLoRA's double quantization)")
    bnb_4bit_compute_dtype: str = option("bfloat16", "dtype the 4-bit layers compute in")
    num_labels: int | None = option(None, "classes of a sequence classifier (default: from the data's labels; 1 = regression)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    trust_remote_code: bool = option(False, "allow the model folder's own Python code (off unless you trust it)")

    def __post_init__(self):
        choice("task", self.task, TASKS)
        choice("dtype", self.dtype, LONG_NAMES)
        choice("quantization", self.quantization, ("none", "4bit", "8bit"))
        choice("bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        choice("bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, LONG_NAMES)
        if not self.path:
            raise ConfigError("path: required: a local model folder or a hub id")
        if self.num_labels is not None and self.num_labels < 1:
            raise ConfigError(f"num_labels: must be >= 1, got {self.num_labels}")


@dataclasses.dataclass
class DistributedConfig:
    deepspeed_config: str | None = option(
        None, "DeepSpeed JSON (ds_configs/) when launching with torchrun/deepspeed; accelerate launch passes its own"
    )
    mixed_precision: str | None = option(None, "no | bf16 | fp16 (fp16 needs a GPU); default: the launcher's setting")

    def __post_init__(self):
        if self.mixed_precision is not None:
            choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise ConfigError(f"deepspeed_config: file {self.deepspeed_config!r} not found (see ds_configs/)")


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


def config_help() -> str:
    """Every key of every section with its default and meaning (from the fields' help)."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} (default {default!r}): {help_of(f)}")
    return "\n".join(lines)


def config_markdown() -> str:
    """docs/configuration.md: every section and key as a Markdown table (key, default, meaning), from
    the same fields as config_help(). Regenerate with ``python -m sora_dist.config --markdown``."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def default_of(f: dataclasses.Field) -> str:
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if value is None:
            return "`null`"
        if isinstance(value, bool):
            return f"`{str(value).lower()}`"
        if value == "":
            return '`""`'
        return f"`{cell(str(value))}`"

    lines = [
        "# Configuration keys of `sora-train`",
        "",
        "<!-- Generated from the schema (sora_dist/config.py): python -m sora_dist.config --markdown > docs/configuration.md -->",
        "",
        "One YAML file drives a run (`sora-train CONFIG`, or `sora train CONFIG`); `--set section.key=value` overrides",
        "one key. The sections `sparsity_schedule` and `sparsity_budget` are optional: present, they choose λ",
        "instead of `train.lambda_*`. `sora-train --help` prints the same keys.",
    ]
    for name, cls in SECTIONS.items():
        lines += ["", f"## `{name}`" + (" (optional)" if name in OPTIONAL_SECTIONS else ""), "", "| key | default | meaning |", "|---|---|---|"]
        lines += [f"| `{name}.{f.name}` | {default_of(f)} | {cell(help_of(f))} |" for f in dataclasses.fields(cls)]
    return "\n".join(lines) + "\n"


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
    for kind in options:
        origin = typing.get_origin(kind) or kind
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
        item = (typing.get_args(kind) or (str,))[0]
        if origin is list and isinstance(value, list) and item is str and all(isinstance(v, str) for v in value):
            return value
        if origin is list and isinstance(value, list) and item is float and all(_is_real(v) for v in value):
            return [float(v) for v in value]
        if origin is dict and isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return dict(value)
    names = " or ".join(str(o).replace("typing.", "") if typing.get_args(o) else getattr(o, "__name__", str(o)) for o in options)
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


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


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
    try:
        raw[section][field] = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: invalid YAML value {text!r}: {getattr(err, 'problem', None) or err}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = (), raw: dict | None = None,
                default_output_dir: str | None = None) -> RunConfig:  # fmt: skip
    """Read, override and validate a run configuration; ``default_output_dir`` is train.output_dir
    when the config names none (sora-train's runs/<config name>)."""
    if raw is None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with sections {', '.join(SECTIONS)}")
    for assignment in overrides:
        set_override(raw, assignment)
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown section; sections: {', '.join(SECTIONS)}")
    if default_output_dir is not None and isinstance(raw.get("train", {}), dict) and not (raw.get("train") or {}).get("output_dir"):
        raw["train"] = {**(raw.get("train") or {}), "output_dir": default_output_dir}
    if isinstance(raw.get("train"), dict) and "steps" in raw["train"] and raw["train"].get("epochs"):
        raise ConfigError("train.epochs: give train.steps or train.epochs, not both")
    sections = {name: build_section(name, raw.get(name)) for name in SECTIONS if name in raw or name not in OPTIONAL_SECTIONS}
    config = RunConfig(**sections)
    if config.sparsity_schedule is not None:
        check_stages(config)
    if config.sparsity_budget is not None:
        check_budget(config)
    check_optimizer_choice(config)
    check_engine(config)
    check_trackers(config.train.report_to)
    if config.train.output_dir:
        check_output_dir(config.train.output_dir)
    return config


def check_output_dir(path: str) -> None:
    """train.output_dir must be (or be creatable as) a writable folder: found now, not after the
    model has loaded (or, with several processes, on one rank only)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"train.output_dir: {path} is a file, not a folder")
    blocker = file_in_the_way(folder)
    if blocker is not None:
        raise ConfigError(f"train.output_dir: cannot create {path}: {blocker} is a file, not a folder")
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir: cannot create or write {path}: no write permission in {existing}")


def check_optimizer_choice(config: RunConfig) -> None:
    """train.optimizer against the DeepSpeed config the run will use (offload) and what is installed."""
    try:
        check_optimizer(config.train.optimizer, offloads_optimizer(launch_ds_config(config.distributed.deepspeed_config)))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_engine(config: RunConfig) -> None:
    """What does not run under FSDP2 (``accelerate launch`` with ``distributed_type: FSDP``), said
    before anything loads."""
    from .backends import fsdp2
    from .backends.optimizers import BITSANDBYTES

    if not fsdp2.requested():
        return
    if config.train.optimizer in BITSANDBYTES:
        raise ConfigError(f"train.optimizer: {config.train.optimizer} does not run under FSDP2 (bitsandbytes' optimizers cannot "
                          "step FSDP2's sharded DTensor parameters): use adamw_torch or adamw_torch_fused, or DeepSpeed")  # fmt: skip
    if config.sparsity_schedule is not None:
        raise ConfigError("sparsity_schedule: not available under FSDP2 (each stage prunes and re-wraps the model): "
                          "run the schedule with DDP or DeepSpeed (launch/zero2.yaml)")  # fmt: skip
    if config.distributed.deepspeed_config is not None:
        raise ConfigError("distributed.deepspeed_config: given while accelerate launch runs FSDP: choose one engine")
    if fsdp2.recomputes_without_rng() and config.sora.dropout > 0:
        raise ConfigError(f"sora.dropout: {config.sora.dropout:g} with fsdp_activation_checkpointing: true, whose recomputation draws "
                          "other dropout masks than the forward (wrong gradients): set model.gradient_checkpointing: true "
                          "and fsdp_activation_checkpointing: false instead, or sora.dropout: 0")  # fmt: skip


def check_budget(config: RunConfig) -> None:
    """Budget mode against the other sections: one way of choosing lambda, a reachable target."""
    budget = config.sparsity_budget
    if config.sparsity_schedule is not None:
        raise ConfigError("sparsity_budget: cannot be combined with sparsity_schedule (both choose lambda): keep one")
    if not config.train.epochs and budget.by_step > config.train.steps:  # with epochs: recipe.steps_from_epochs
        raise ConfigError(f"sparsity_budget.by_step: must be <= train.steps={config.train.steps}, got {budget.by_step}")
    if budget.target_rank is not None and budget.target_rank > config.sora.r:
        raise ConfigError(f"sparsity_budget.target_rank: must be <= sora.r={config.sora.r}, got {budget.target_rank}")
    if (config.train.gate_update, config.train.threshold) == (GATE_UPDATES[0], "lr_scaled") and budget.lambda_max <= 1:
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
        dataclasses.replace(config.train, steps=schedule.steps_per_stage or config.train.steps)
    except ValueError as err:
        message = str(err).replace("TrainConfig.", "train.").replace("steps=", "sparsity_schedule.steps_per_stage=")
        raise ConfigError(f"sparsity_schedule.steps_per_stage: each stage is one training run: {message}") from None


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m sora_dist.config --markdown > docs/configuration.md")
    sys.stdout.write(config_markdown())
