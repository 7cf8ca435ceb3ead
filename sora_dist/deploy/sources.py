"""Find an adapter in whatever a training run left on disk.

Accepted: an adapter folder (``save_sora``); a run's output folder (its final ``adapter/``, else
its newest checkpoint); a training checkpoint folder of any backend. From a DeepSpeed ZeRO-1/2/3
checkpoint only the trainable (adapter) tensors are consolidated from the fp32 optimizer shards,
from an FSDP2 checkpoint (torch.distributed.checkpoint) they are read whole in one process; the
frozen model is never assembled.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..backends import fsdp2
from .io import CONFIG_NAME, WEIGHTS_NAME, check_tensors, read_adapter, read_metadata, read_tensors
from .layout import ADAPTER_DIR, CHECKPOINT_DIR, complete_checkpoints


def resolve_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(metadata, tensors, description of the source) for an adapter, run or checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such adapter, run or checkpoint folder")
    if (path / WEIGHTS_NAME).is_file():
        meta, tensors = read_adapter(path)
        return meta, tensors, str(path)
    if (path / ADAPTER_DIR / WEIGHTS_NAME).is_file():
        return resolve_adapter(path / ADAPTER_DIR)
    complete = complete_checkpoints(path)
    if complete:
        return resolve_adapter(complete[-1])
    if (path / CONFIG_NAME).is_file():
        meta = _read_meta(path)
        return meta, checkpoint_tensors(path, meta), f"{path} (training checkpoint)"
    raise FileNotFoundError(
        f"{path}: found no adapter: expected {WEIGHTS_NAME} + {CONFIG_NAME} (save_sora), a run folder with "
        f"{ADAPTER_DIR}/ or {CHECKPOINT_DIR}/step-*/, or a training checkpoint with {CONFIG_NAME}"
    )


def _read_meta(path: Path) -> dict:
    return read_metadata(path / CONFIG_NAME)


def wanted_names(meta: dict) -> list[str]:
    names = [f"{m}.{k}" for m in meta["modules"] for k in ("lora_A", "lora_B", "gate")]
    return names + list(meta.get("trainable", []))


def checkpoint_tensors(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The adapter tensors of a checkpoint folder, from DeepSpeed shards or a plain model file."""
    state = fsdp2.read_trainable(path) if fsdp2.is_checkpoint(path) else _deepspeed_trainable(path)
    if state is None:
        files = sorted(path.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{path}: has {CONFIG_NAME} but no {WEIGHTS_NAME} (an adapter folder), nor model*.safetensors or DeepSpeed "
                "shards (a training checkpoint)"
            )
        state = {}
        for file in files:
            state.update(read_tensors(file))
    state = {_strip_wrappers(k): v for k, v in state.items()}
    missing = [n for n in wanted_names(meta) if n not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks adapter tensor {missing[0]!r} ({len(missing)} missing)")
    tensors = {name: state[name].float() if name.endswith(".gate") else state[name] for name in wanted_names(meta)}
    check_tensors(meta, tensors, str(path))
    return tensors


def _strip_wrappers(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        key = key.removeprefix(prefix)
    return key


def _deepspeed_trainable(path: Path) -> dict[str, torch.Tensor] | None:
    """Consolidated fp32 trainable tensors of a DeepSpeed checkpoint under ``path``, or None."""
    shard_files = list(path.rglob("zero_pp_rank_*optim_states.pt")) + list(path.rglob("*mp_rank_00_model_states.pt"))
    if not shard_files:
        return None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = shard_files[0].parent
    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name, exclude_frozen_parameters=True)
