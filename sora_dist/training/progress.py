"""What a run shows and records: the progress bar, the metrics log (JSONL, and the experiment
trackers of train.report_to), the training metrics of a step, and the final sparsity report and heatmap."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..core.optim import last_lambda, learning_rates
from ..core.report import sparsity_report
from ..deploy.layout import METRICS_FILE
from ..sparsity.plots import rank_heatmap
from .config import TrainConfig
from .trackers import heatmap_wanted, log_heatmap, tracker_scalars


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl``.

    Only the main process writes; others get a log that ignores every call.
    """

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")


class Progress:
    """tqdm on the main process, the metrics log (JSONL) in the output folder, and the same numbers
    to the Accelerator's experiment trackers (``accelerator.log``) at ``step_offset + step``."""

    def __init__(self, accelerator, config: TrainConfig, start: int, step_offset: int = 0):
        from tqdm.auto import tqdm

        self.accelerator = accelerator
        self.step_offset = step_offset
        self.main = accelerator.is_main_process
        self.bar = tqdm(total=config.steps, initial=start, disable=not self.main, desc="train", dynamic_ncols=True)
        self.log = MetricsLog(config.output_dir, enabled=self.main) if config.output_dir else None

    def record(self, step: int, kind: str, values: dict) -> None:
        if self.log is not None:
            self.log.log(step, kind, values)
        scalars = tracker_scalars(kind, values)
        if scalars:
            self.accelerator.log(scalars, step=self.step_offset + step)
        if self.main and kind == "train":
            self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in values.items()}, refresh=False)
        elif self.main:
            self.bar.write(f"step {step} {kind}: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))

    def heatmap(self, model, step: int) -> None:
        """The rank heatmap into the trackers at this step; every rank calls it (the report is a collective)."""
        if heatmap_wanted(self.accelerator):
            log_heatmap(self.accelerator, sparsity_report(self.accelerator.unwrap_model(model)), self.step_offset + step)

    def close(self) -> None:
        self.bar.close()


def train_metrics(accelerator, model, optimizer, loss: torch.Tensor) -> dict:
    """Every rank calls this: the loss average and the ZeRO-3 gate gather are collectives."""
    mean_loss = accelerator.reduce(loss, reduction="mean").item()
    report = sparsity_report(accelerator.unwrap_model(model))
    lr, gate_lr = learning_rates(optimizer)
    return {
        "loss": mean_loss,
        "lr": lr,
        "gate_lr": gate_lr,
        "lambda": last_lambda(optimizer),
        "live_ranks": report.live_rank,
        "adapter_params": report.params,
    }


def write_final_report(accelerator, model, output_dir: Path, tracker_step: int | None = None) -> None:
    """Sparsity report (JSON) and the rank-per-layer heatmap (PNG, when matplotlib is installed;
    also into the experiment trackers at ``tracker_step`` when given)."""
    report = sparsity_report(accelerator.unwrap_model(model))
    if tracker_step is not None:
        log_heatmap(accelerator, report, tracker_step)
    if not accelerator.is_main_process:
        return
    (output_dir / "sparsity.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    try:
        rank_heatmap(report, output_dir / "rank_heatmap.png")
    except ImportError:
        print("matplotlib is not installed: skipped rank_heatmap.png", flush=True)
