"""Evaluation metrics: classification (accuracy, macro F1, MCC) and Pearson correlation."""

from __future__ import annotations

import math

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
