"""From adapter files to deployable pieces: the folded LoRA, and a standard PEFT LoRA adapter.

Folding (docs/method.md, "Prune, fold, merge"): with K = {i : g_i ≠ 0}, A' = A[K, :] and B' = B[:, K] · diag(g_K) form an
ordinary LoRA of rank |K| with the same scale s. A module with |K| = 0 has no adapter at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .atomic import write_folder

PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass
class FoldedLoRA:
    """One module's pruned, gate-folded LoRA: ΔW = scale · B @ A (fp32). ``fan_in_fan_out``: the
    base stores its weight as in x out (Conv1D), so the stored delta is ΔWᵀ."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.B.to(dtype) * self.scale) @ self.A.to(dtype)

    def stored_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW in the layout of the base's stored weight."""
        delta = self.delta_weight(dtype)
        return delta.t() if self.fan_in_fan_out else delta


def fold_adapter(meta: dict, tensors: dict[str, torch.Tensor]) -> dict[str, FoldedLoRA]:
    """Folded LoRA of every module with at least one live rank, keyed by module name."""
    folded = {}
    for name, spec in meta["modules"].items():
        gate = tensors[f"{name}.gate"].float()
        keep = torch.nonzero(gate != 0).flatten()
        if keep.numel() == 0:
            continue
        A = tensors[f"{name}.lora_A"].float()[keep]
        B = tensors[f"{name}.lora_B"].float()[:, keep] * gate[keep]
        folded[name] = FoldedLoRA(A.contiguous(), B.contiguous(), float(spec["scale"]), bool(spec.get("fan_in_fan_out")))
    return folded


def extra_trainable(meta: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained tensors outside the SoRA branches (e.g. a classifier head), by parameter name."""
    return {name: tensors[name] for name in meta.get("trainable", [])}


def write_new_folder(out: Path, fill, force: bool) -> Path:
    """:func:`~sora_dist.deploy.atomic.write_folder`, refusing an existing ``out`` unless ``force``."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    return write_folder(out, fill)


def peft_task_type(meta: dict) -> str | None:
    task = meta.get("task")
    return {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS"}.get(task)


def export_peft(meta: dict, tensors: dict[str, torch.Tensor], out: str | os.PathLike, force: bool = False, source: str = "adapter") -> dict:
    """Write an adapter (``read_adapter``'s meta and tensors) as a PEFT LoRA adapter folder.

    Per-module ranks go to ``rank_pattern`` and ``alpha_pattern`` = s · r', so PEFT's scale
    alpha'/r' equals SoRA's s. Modules with no live rank are left out. Returns the config written.
    """
    folded = fold_adapter(meta, tensors)
    if not folded:
        raise ValueError(f"{source}: every gate is zero, so the adapter is empty: there is no LoRA to export")
    names = sorted(folded)
    ranks = {name: folded[name].rank for name in names}
    default_r = max(set(ranks.values()), key=list(ranks.values()).count)
    extras = extra_trainable(meta, tensors)
    config = {
        "peft_type": "LORA",
        "task_type": peft_task_type(meta),
        "base_model_name_or_path": meta.get("base_model", {}).get("name_or_path") or None,
        "r": default_r,
        "lora_alpha": folded[names[0]].scale * default_r,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(folded[name].fan_in_fan_out for name in names),
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": names,
        "rank_pattern": ranks,
        "alpha_pattern": {name: folded[name].scale * ranks[name] for name in names},
        "modules_to_save": sorted({name.rsplit(".", 1)[0] for name in extras}) or None,
    }
    weights = {}
    for name in names:
        weights[f"{PEFT_PREFIX}{name}.lora_A.weight"] = folded[name].A
        weights[f"{PEFT_PREFIX}{name}.lora_B.weight"] = folded[name].B
    for name, tensor in extras.items():
        weights[PEFT_PREFIX + name] = tensor

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    write_new_folder(Path(out), write, force)
    return config
