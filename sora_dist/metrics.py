"""Evaluation metrics and the run's metrics log (JSONL, plus TensorBoard when installed)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    """Accuracy, macro F1 and Matthews correlation (multi-class form) of integer predictions."""
    predictions, labels = predictions.long().flatten(), labels.long().flatten()
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64)
    confusion.index_put_((labels, predictions), torch.ones_like(labels, dtype=torch.float64), accumulate=True)
    true_pos = confusion.diag()
    predicted, actual, total = confusion.sum(0), confusion.sum(1), confusion.sum()
    precision = true_pos / predicted.clamp_min(1)
    recall = true_pos / actual.clamp_min(1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-300), 0.0)
    correct = true_pos.sum()
    mcc_den = math.sqrt(float((total**2 - (predicted**2).sum()) * (total**2 - (actual**2).sum())))
    mcc = float(correct * total - (predicted * actual).sum()) / mcc_den if mcc_den > 0 else 0.0
    return {"accuracy": float(correct / total), "f1": float(f1.mean()), "mcc": mcc}


def pearson(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    x, y = predictions.double().flatten(), targets.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else 0.0


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl``; mirrors scalars to TensorBoard if present.

    Only the main process writes; others get a log that ignores every call.
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.tensorboard = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))

    def log(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
