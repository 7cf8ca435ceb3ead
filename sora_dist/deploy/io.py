"""Adapter files: ``adapter_model.safetensors`` + ``sora_config.json``; safetensors only."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..backends.fsdp2 import whole
from ..backends.linear import declared_features, is_conv1d
from ..backends.zero import gathered
from ..core.config import SoRAConfig
from ..core.inject import inject_sora, sora_modules
from .atomic import write_folder

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "sora_config.json"
FORMAT_VERSION = 1
IDENTITY_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")


def base_identity(model: nn.Module) -> dict:
    """What identifies the base model an adapter belongs to (from its transformers config)."""
    config = getattr(model, "config", None)
    if config is None:
        return {"class": type(model).__name__}
    return config_identity({key: getattr(config, key, None) for key in (*IDENTITY_KEYS, "_name_or_path")})


def config_identity(config: dict) -> dict:
    """The identity fields of a transformers config given as a dict (e.g. a config.json).

    Names are the standard ones; a model family's own names (GPT-2's ``n_embd`` for
    ``hidden_size``) are read through transformers' attribute map of that model type.
    """
    aliases = _attribute_map(config.get("model_type"))
    config = {**{standard: config[own] for standard, own in aliases.items() if own in config}, **config}
    identity = {key: config[key] for key in IDENTITY_KEYS if config.get(key) is not None}
    identity["name_or_path"] = config.get("_name_or_path") or ""
    return identity


def _attribute_map(model_type: str | None) -> dict[str, str]:
    """transformers' standard-name -> own-name map of a model type ({} when unknown)."""
    if not model_type:
        return {}
    from transformers import CONFIG_MAPPING

    try:
        return dict(getattr(CONFIG_MAPPING[model_type], "attribute_map", {}))
    except KeyError:
        return {}


def identity_mismatch(saved: dict, current: dict) -> str | None:
    """The first identity field in which two bases differ (the name or path never counts)."""
    for key in sorted(set(saved) | set(current)):
        if key != "name_or_path" and saved.get(key) != current.get(key):
            return key
    return None


def model_task(model: nn.Module) -> str | None:
    """``causal_lm`` or ``sequence_classification`` from the transformers class name, else None."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if name.endswith("ForSequenceClassification"):
        return "sequence_classification"
    return None


def auto_class(task: str | None):
    """The transformers Auto class of a task (``causal_lm`` when unknown): the inverse of :func:`model_task`."""
    import transformers

    if task == "sequence_classification":
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM


def base_quantization(model: nn.Module) -> dict | None:
    """The base's quantization settings (bitsandbytes 4/8-bit), as transformers recorded them."""
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if quant is None:
        return None
    as_dict = quant.to_dict() if hasattr(quant, "to_dict") else dict(quant)
    return json.loads(json.dumps(as_dict, default=str))


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def module_specs(model: nn.Module) -> dict[str, dict]:
    """Shape, rank and scale of every SoRA module (no tensor data, so no gathering).

    ``fan_in_fan_out`` (PEFT's name) marks a base that stores its weight as in x out (Conv1D):
    a merge into the base's files adds ΔW transposed.
    """
    specs = {}
    for name, m in sora_modules(model):
        specs[name] = {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank, "scale": m.scale}
        if is_conv1d(m.base):
            specs[name]["fan_in_fan_out"] = True
    return specs


def extra_trainable_names(model: nn.Module) -> list[str]:
    """Trainable parameters outside the SoRA branches (e.g. a classifier head kept by modules_to_save)."""
    sora_ids = {id(p) for _, m in sora_modules(model) for p in (m.lora_A, m.lora_B, m.gate)}
    return sorted(name for name, p in model.named_parameters() if p.requires_grad and id(p) not in sora_ids)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every SoRA tensor and every other trainable tensor, full (gathered under ZeRO-3 and FSDP2), on CPU."""
    tensors = {}
    for name, module in sora_modules(model):
        params = [module.lora_A, module.lora_B, module.gate]
        with gathered(params):
            for key, param in zip(("lora_A", "lora_B", "gate"), params):
                tensors[f"{name}.{key}"] = whole(param.detach()).to("cpu", copy=True).contiguous()
    params = dict(model.named_parameters())
    for name in extra_trainable_names(model):
        with gathered([params[name]]):
            tensors[name] = whole(params[name].detach()).to("cpu", copy=True).contiguous()
    return tensors


def adapter_metadata(model: nn.Module, extra: dict | None = None) -> dict:
    """The ``sora_config.json`` content: hyperparameters, per-module shapes/ranks/scales, base identity."""
    return {
        "format": "sora_dist",
        "format_version": FORMAT_VERSION,
        "sora": model.sora_config.to_dict(),
        "modules": module_specs(model),
        "trainable": extra_trainable_names(model),
        "base_model": base_identity(model),
        "task": model_task(model),
        "base_quantization": base_quantization(model),
        **(extra or {}),
    }


def save_sora(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the adapter of ``model`` to the folder ``path``, atomically.

    Under ZeRO-3 and FSDP2 every rank must call this (the tensors are gathered); only rank 0 writes.
    """
    config = getattr(model, "sora_config", None)
    if config is None:
        raise ValueError("the model has no SoRA adapter to save (no sora_config); call inject_sora first")
    tensors = adapter_state(model)
    bad = next((key for key, tensor in tensors.items() if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)
    if bad is not None:  # every rank holds the gathered tensors, so every rank stops here together
        raise ValueError(f"{path}: not written: adapter tensor {bad!r} holds NaN or inf values (lower train.lr or gate_lr, or check the data)")
    path = Path(path)
    if not _is_main_process():
        return path
    meta = adapter_metadata(model, extra)

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_metadata(tmp, meta)

    return write_folder(path, fill)


def write_metadata(folder: Path, meta: dict) -> None:
    """``sora_config.json`` into ``folder``."""
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an adapter folder, checked against each other; errors name the file."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: {path} is not a sora_dist adapter folder (save_sora writes one)")
    meta = read_metadata(config_file)
    tensors = read_tensors(weights_file)
    check_tensors(meta, tensors, str(weights_file))
    return meta, tensors


SPEC_KEYS = ("in_features", "out_features", "rank", "scale")


def read_metadata(config_file: Path) -> dict:
    """``sora_config.json`` with the structure the readers rely on, or ValueError naming file and key."""
    try:
        meta = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{config_file}: not UTF-8 text ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}:{err.lineno}: invalid JSON: {err.msg}") from err
    if not isinstance(meta, dict) or meta.get("format") != "sora_dist":
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{config_file}: not a sora_dist adapter config (format={found!r})")
    for key, kind in (("modules", dict), ("base_model", dict), ("sora", dict)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{config_file}: '{key}' must be a {kind.__name__}, got {type(meta.get(key)).__name__}")
    if not isinstance(meta.get("trainable", []), list):
        raise ValueError(f"{config_file}: 'trainable' must be a list")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{config_file}: format_version {version!r} is newer than this sora_dist reads ({FORMAT_VERSION}): upgrade sora_dist")
    for name, spec in meta["modules"].items():
        if not isinstance(spec, dict) or any(not isinstance(spec.get(k), (int, float)) or isinstance(spec.get(k), bool) for k in SPEC_KEYS):
            raise ValueError(f"{config_file}: modules.{name} must give the numbers {', '.join(SPEC_KEYS)}")
        for key, low in (("rank", 0), ("in_features", 1), ("out_features", 1)):
            if not isinstance(spec[key], int) or spec[key] < low:
                raise ValueError(f"{config_file}: modules.{name}.{key} must be an integer >= {low}, got {spec[key]!r}")
        if not math.isfinite(spec["scale"]):
            raise ValueError(f"{config_file}: modules.{name}.scale must be a finite number, got {spec['scale']!r}")
    return meta


def read_tensors(weights_file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or ValueError naming it (truncated, not safetensors)."""
    try:
        return load_file(str(weights_file))
    except Exception as err:  # safetensors raises its own SafetensorError and OSError subclasses
        raise ValueError(f"{weights_file}: cannot be read as safetensors ({type(err).__name__}: {err})") from None


def check_tensors(meta: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor ``meta`` implies is there, with its shape, and finite."""
    wanted = {}
    for name, spec in meta["modules"].items():
        rank, d_in, d_out = int(spec["rank"]), int(spec["in_features"]), int(spec["out_features"])
        wanted.update({f"{name}.lora_A": (rank, d_in), f"{name}.lora_B": (d_out, rank), f"{name}.gate": (rank,)})
    for key in meta.get("trainable", []):
        wanted[key] = None
    for key, shape in wanted.items():
        if key not in tensors:
            raise ValueError(f"{where}: tensor {key!r} is missing ({len([k for k in wanted if k not in tensors])} missing)")
        tensor = tensors[key]
        if shape is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{where}: tensor {key!r} has shape {list(tensor.shape)}, expected {list(shape)} from {CONFIG_NAME}")
        if not tensor.is_floating_point():
            raise ValueError(f"{where}: tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; adapter tensors are floating-point")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{where}: tensor {key!r} holds NaN or inf values")


def check_compatible(meta: dict, model: nn.Module, where: str) -> None:
    """Fail with the first difference between the adapter's base and ``model``."""
    saved, current = meta["base_model"], base_identity(model)
    key = identity_mismatch(saved, current)
    if key is not None:
        raise ValueError(
            f"{where}: adapter does not fit this base model: base_model.{key} is {saved.get(key)!r} "
            f"in the adapter (trained on {saved.get('name_or_path') or 'unknown'!r}) but "
            f"{current.get(key)!r} in the model"
        )
    for name, spec in meta["modules"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where}: adapter module {name!r} does not exist in {type(model).__name__}") from None
        base = getattr(module, "base", module)
        try:
            features = dict(zip(("in_features", "out_features"), declared_features(base)))
        except TypeError as err:
            raise ValueError(f"{where}: adapter module {name!r}: {err}") from None
        for key, value in features.items():
            if value != spec[key]:
                raise ValueError(f"{where}: module {name!r}: {key} is {spec[key]} in the adapter but {value} in the model")


@torch.no_grad()
def load_sora(model: nn.Module, path: str | os.PathLike, verbose: bool = False) -> nn.Module:
    """Load an adapter folder into ``model``, injecting SoRA first when the model has none.

    The model must be the base the adapter was trained on: identity and every target shape are
    checked before anything changes.
    """
    meta, tensors = read_adapter(path)
    return apply_adapter(model, meta, tensors, str(Path(path) / CONFIG_NAME), verbose)


@torch.no_grad()
def apply_adapter(model: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], where: str, verbose: bool = False) -> nn.Module:
    """:func:`load_sora` from adapter metadata and tensors already in memory."""
    check_compatible(meta, model, where)
    if not any(True for _ in sora_modules(model)):
        exact_names = "|".join(re.escape(name) for name in sorted(meta["modules"]))
        inject_sora(model, SoRAConfig(**{**meta["sora"], "target_modules": exact_names}), verbose=verbose)
    loaded = dict(sora_modules(model))
    if set(loaded) != set(meta["modules"]):
        extra = sorted(set(loaded) ^ set(meta["modules"]))[0]
        raise ValueError(f"{where}: the model's SoRA modules differ from the adapter's (first: {extra!r})")
    for name, module in loaded.items():
        module.scale = float(meta["modules"][name]["scale"])
        for key in ("lora_A", "lora_B", "gate"):
            old = getattr(module, key)
            new = tensors[f"{name}.{key}"].to(old.device)
            setattr(module, key, nn.Parameter(new, requires_grad=old.requires_grad))
    params = dict(model.named_parameters())
    for name in meta["trainable"]:
        if name not in params:
            raise ValueError(f"{where}: trainable tensor {name!r} has no parameter in the model")
        params[name].data.copy_(tensors[name])
    return model
