"""Load the base model and tokenizer a run trains: local folder or hub id, dtype, 4/8-bit."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .backends.accelerate import cpu_only
from .deploy.io import auto_class
from .options import one_line

TASKS = ("causal_lm", "sequence_classification")


class ModelNotFound(FileNotFoundError):
    """The model is neither a local folder nor available offline from the hub cache."""


def bnb_config(quantization: str, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16, storage_dtype: torch.dtype | None = None):
    """transformers' BitsAndBytesConfig for ``quantization`` in {"4bit", "8bit"}.

    A 4-bit base stores its packed weight as ``storage_dtype`` (the model dtype), so that
    DeepSpeed ZeRO-3 can partition it like any other tensor.
    """
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage_dtype or compute_dtype,
    )


def resolve_model_path(path: str) -> str:
    """``asset:NAME`` names a model that installs offline from a package (sora_dist.data.assets.MODELS)."""
    from .data import assets

    try:
        return assets.resolve(path, assets.MODELS, "model.path")
    except KeyError as err:
        raise ModelNotFound(err.args[0]) from None


def load_model(
    path: str,
    task: str = "causal_lm",
    dtype: torch.dtype = torch.float32,
    quantization: str = "none",
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    num_labels: int | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A causal LM or sequence classifier; call after ``build_accelerator`` (ZeRO-3 loads partitioned)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if quantization != "none":
        kwargs["quantization_config"] = bnb_config(quantization, quant_type, double_quant, compute_dtype, dtype)
        if not is_deepspeed_zero3_enabled():  # ZeRO-3 refuses a device_map and partitions the model itself
            kwargs["device_map"] = "cpu" if cpu_only() else {"": torch.cuda.current_device()}
    resolved = resolve_model_path(path)
    check_weight_files(resolved)
    try:
        model = auto_class(task).from_pretrained(resolved, **kwargs)
    except OSError as err:
        raise ModelNotFound(_not_found(path, err)) from None
    except (ValueError, KeyError, TypeError) as err:  # transformers' complaints about a local folder's files
        if not Path(resolved).is_dir():
            raise
        raise ModelNotFound(f"model.path {path!r}: cannot load a {task} model from this folder: {one_line(err)}") from None
    if task == "sequence_classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    resolved = resolve_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelNotFound(_not_found(path, err)) from None
    except (ValueError, KeyError, TypeError) as err:
        if not Path(resolved).is_dir():
            raise
        raise ModelNotFound(f"model.path {path!r}: cannot load the tokenizer from this folder: {one_line(err)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_weight_files(folder: str) -> None:
    """Every safetensors file of a local model folder opens (header and size): a truncated download
    is named here, not deep inside from_pretrained. Reads headers only."""
    from safetensors import safe_open

    if not Path(folder).is_dir():
        return
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as err:  # safetensors raises its own SafetensorError and OSError subclasses
            raise ModelNotFound(f"model.path: {file}: cannot be read as safetensors ({one_line(err)}); download it again") from None


def _not_found(path: str, err: Exception) -> str:
    if Path(path).exists():
        return f"model.path {path!r}: cannot load a transformers model from this folder: {one_line(err)}"
    return (
        f"model.path {path!r} is not a local folder and could not be loaded from the Hugging Face hub "
        f"(offline, or not in the cache). Download it where the network is reachable "
        f"(`huggingface-cli download {path} --local-dir DIR`) and set model.path to DIR."
    )
