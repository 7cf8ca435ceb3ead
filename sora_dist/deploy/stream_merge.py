"""Merge an adapter into a base model's files, one safetensors shard at a time.

Peak memory is about one shard of the base plus the adapter, whatever the model's size. The
output is an ordinary transformers folder (config, generation config, tokenizer files, shards and
an index) that ``from_pretrained`` loads without sora_dist.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from ..backends.bnb import quantization_error
from ..backends.dtypes import DTYPES, SHORT_NAMES, dtype_name
from .export import FoldedLoRA, extra_trainable, fold_adapter, write_new_folder
from .io import config_identity, identity_mismatch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


@dataclasses.dataclass
class StreamMergeResult:
    out: Path
    merged_modules: int
    shards: int
    peak_rss_bytes: int
    quantize_error: dict | None = None

    def summary(self) -> str:
        text = (
            f"merged {self.merged_modules} modules across {self.shards} shard(s) into {self.out}; "
            f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"
        )
        if self.quantize_error:
            text += (
                f"; requantization error: max |W_q - W| = {self.quantize_error['max_abs']:.3g}, "
                f"max relative (Frobenius) = {self.quantize_error['max_rel']:.3g}"
            )
        return text


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def open_shard(path: Path):
    """``safe_open`` of one base shard; a truncated or foreign file is a ValueError naming it."""
    try:
        return safe_open(str(path), "pt")
    except Exception as err:  # safetensors raises its own SafetensorError and OSError subclasses
        raise ValueError(f"{path}: cannot be read as safetensors ({type(err).__name__}: {err})") from None


def read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: invalid {what}: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: invalid {what}: expected a JSON object, got {type(value).__name__}")
    return value


def base_shards(base: Path) -> dict[str, list[str]]:
    """Shard file -> tensor names, in the order the base stores them."""
    index = base / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: invalid safetensors index: no 'weight_map' object")
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(shard, []).append(key)
        return shards
    single = base / SINGLE_NAME
    if single.is_file():
        with open_shard(single) as f:
            return {SINGLE_NAME: list(f.keys())}
    raise FileNotFoundError(
        f"{base}: no {SINGLE_NAME} or {INDEX_NAME}: the base must be a transformers folder with safetensors "
        "weights (load and save_pretrained it once to convert .bin weights)"
    )


def check_base(base: Path, meta: dict, shards: dict[str, list[str]], adapter: str) -> dict:
    """Fail with the first difference between the base folder and the adapter's base; return config.json."""
    config_file = base / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {base} is not a transformers model folder")
    config = read_json(config_file, "model config")
    if config.get("quantization_config"):
        raise ValueError(
            f"{config_file}: the base is quantized ({config['quantization_config'].get('quant_method')}); merge into the "
            "full-precision base the quantized model was made from (and pass --quantize to requantize)"
        )
    saved = meta["base_model"]
    key = identity_mismatch(saved, config_identity(config))
    if key is not None:
        raise ValueError(
            f"{adapter}: adapter does not fit {base}: base_model.{key} is {saved.get(key)!r} in the adapter "
            f"but {config.get(key)!r} in {config_file}"
        )
    shapes = {}
    for shard, keys in shards.items():
        with open_shard(base / shard) as f:
            for key in keys:
                if key.endswith(".weight"):
                    shapes[key] = f.get_slice(key).get_shape()
    for name, spec in meta["modules"].items():
        key = f"{name}.weight"
        if key not in shapes:
            raise ValueError(f"{adapter}: module {name!r} has no weight {key!r} in {base}")
        stored = [spec["out_features"], spec["in_features"]]
        if spec.get("fan_in_fan_out"):
            stored.reverse()  # Conv1D stores in x out
        if list(shapes[key]) != stored:
            raise ValueError(
                f"{adapter}: module {name!r} is stored as {'x'.join(map(str, stored))} in the adapter's base "
                f"but {key} is {'x'.join(map(str, shapes[key]))} in {base}"
            )
    return config


def merge_files(
    base: str | Path,
    meta: dict,
    tensors: dict[str, torch.Tensor],
    out: str | Path,
    dtype: str | None = None,
    quantize: str | None = None,
    force: bool = False,
    adapter_name: str = "adapter",
) -> StreamMergeResult:
    """Stream ``base``'s shards through W += s · B' A' and write the merged model to ``out``."""
    base, out = Path(base), Path(out)
    if dtype is not None and dtype not in SHORT_NAMES:
        raise ValueError(f"--dtype must be one of {list(SHORT_NAMES)}, got {dtype!r}")
    if quantize not in (None, "nf4", "fp4"):
        raise ValueError(f"--quantize must be nf4 or fp4, got {quantize!r}")
    shards = base_shards(base)
    check_base(base, meta, shards, adapter_name)
    folded: dict[str, FoldedLoRA] = fold_adapter(meta, tensors)
    replaced = extra_trainable(meta, tensors)
    out_dtype = DTYPES[dtype] if dtype else None
    errors: list[tuple[float, float]] = []
    merged_count = 0

    def merge_tensor(key: str, tensor: torch.Tensor) -> torch.Tensor:
        nonlocal merged_count
        target = out_dtype if out_dtype is not None and tensor.is_floating_point() else tensor.dtype
        if key in replaced:
            return replaced[key].to(target)
        lora = folded.get(key.removesuffix(".weight")) if key.endswith(".weight") else None
        if lora is None:
            return tensor.to(target)
        merged_count += 1
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{base}: base tensor {key!r} holds NaN or inf values; nothing was written")
        merged = (tensor.double() + lora.stored_delta(torch.float64)).to(target)
        if quantize:
            errors.append(quantization_error(merged, quantize))
        return merged

    def write(tmp: Path) -> None:
        weight_map, total = {}, 0
        leftover = {k: v for k, v in replaced.items() if not any(k in keys for keys in shards.values())}
        names = list(shards)
        for i, shard in enumerate(names):
            with open_shard(base / shard) as source:
                extra = leftover if i == len(names) - 1 else {}
                specs = [(key, _out_dtype(source.get_slice(key).get_dtype(), out_dtype), source.get_slice(key).get_shape()) for key in shards[shard]]
                specs += [(key, out_dtype or t.dtype, list(t.shape)) for key, t in extra.items()]
                tensors = ((key, extra[key].to(dtype) if key in extra else merge_tensor(key, source.get_tensor(key))) for key, dtype, _ in specs)
                total += write_safetensors(tmp / shard, specs, tensors)
            weight_map.update({key: shard for key, _, _ in specs})
        if len(names) > 1 or (base / INDEX_NAME).is_file():
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        copy_side_files(base, tmp, out_dtype)
        if quantize:
            requantize_folder(tmp, quantize)

    write_new_folder(out, write, force)
    quant_error = None
    if errors:
        quant_error = {"max_abs": max(e[0] for e in errors), "max_rel": max(e[1] for e in errors), "quant_type": quantize}
    return StreamMergeResult(out, merged_count, len(shards), peak_rss_bytes(), quant_error)


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
FROM_SAFETENSORS = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def _out_dtype(stored: str, out_dtype: torch.dtype | None) -> torch.dtype:
    dtype = FROM_SAFETENSORS[stored]
    return out_dtype if out_dtype is not None and dtype.is_floating_point else dtype


def write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, list[int]]], tensors) -> int:
    """Write a safetensors file one tensor at a time; returns the data size in bytes.

    ``safetensors.torch.save_file`` needs every tensor in memory and copies them all to bytes
    first (twice a shard). Here the header is built from the known names, dtypes and shapes, and
    each tensor from the ``(name, tensor)`` iterator is written and dropped before the next one is
    made, so at most one tensor of the output exists at a time.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, dtype, shape in specs:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for (key, dtype, shape), (name, tensor) in zip(specs, tensors):
            if name != key or tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise RuntimeError(f"{path}: tensor {name} {tensor.dtype} {list(tensor.shape)} does not match its header entry {key} {dtype} {shape}")
            out.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return offset


def copy_side_files(base: Path, out: Path, dtype: torch.dtype | None) -> None:
    """Config, generation config, tokenizer and other non-weight files; config.json gets the new dtype."""
    for item in base.iterdir():
        if item.name == INDEX_NAME or item.suffix in WEIGHT_SUFFIXES or item.name.startswith("."):
            continue
        if item.is_dir():
            continue
        shutil.copy2(item, out / item.name)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    if dtype is not None:
        name = dtype_name(dtype)
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "dtype":
                config[key] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def requantize_folder(folder: Path, quant_type: str) -> None:
    """Replace the dense weights in ``folder`` by a bitsandbytes 4-bit serialization (transformers' own)."""
    from transformers import AutoConfig, AutoModel, BitsAndBytesConfig

    config = AutoConfig.from_pretrained(folder)
    model_class = _architecture_class(config) or AutoModel
    compute = torch.bfloat16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    model = model_class.from_pretrained(folder, quantization_config=quant, device_map="cpu", dtype=compute)
    for stale in folder.glob("*.safetensors"):
        stale.unlink()
    (folder / INDEX_NAME).unlink(missing_ok=True)
    model.save_pretrained(folder)


def _architecture_class(config):
    """The transformers class named by ``config.architectures`` (None when there is none)."""
    import transformers

    for architecture in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, architecture, None)
        if cls is not None:
            return cls
    return None
