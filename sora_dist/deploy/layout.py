"""What a run folder holds, in one place: every writer and reader of run folders uses these names.

    <output_dir>/config.yaml, metrics.jsonl, summary.json, sparsity.json, rank_heatmap.png
    <output_dir>/adapter/                     the final adapter (deploy.io format)
    <output_dir>/checkpoints/step-00000100/   a complete checkpoint: has STATE_NAME
    <output_dir>/stages/stage-<k>/            the sparsifying schedule's stages, each a run folder
"""

from __future__ import annotations

import os
from pathlib import Path

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "sora_state.json"  # written last into a checkpoint: its presence marks it complete
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def adapter_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / ADAPTER_DIR


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step-{step:08d}"


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first; a half-written one (killed mid-save) has no state file."""
    root = checkpoint_root(output_dir)
    return sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file()) if root.is_dir() else []


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def stage_dir(output_dir: str | os.PathLike, stage: int) -> Path:
    return Path(output_dir) / "stages" / f"stage-{stage}"
