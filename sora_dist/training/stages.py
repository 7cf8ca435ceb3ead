"""The sparsifying scheduler (Algorithm 1; docs/method.md): λ rises through K stages, each a full training run.

It lives with the training loop, not in ``sparsity/``: it does not choose λ per step (each stage
runs :func:`~sora_dist.training.loop.train` with a constant λ), it runs the loop K times.


Stage k trains the adapter left by stage k-1 with a constant λ_k and its own warm-up/decay
learning-rate schedule (the released code reused schedulers that were already exhausted, so later
stages ran at lr 0). Each stage is one call of :func:`sora_dist.training.loop.train` with a fresh
optimizer: the Adam moments restart at every stage, the adapter carries over. After a stage we
record

- generalization = validation score / best stage-0 validation score × 100
- memorization   = score on a fixed training subset / its stage-0 value × 100
- the number of non-zero adapter parameters, and the stage's adapter (``stages/stage-k/adapter``)
- the adapter's physical size during the stage (``adapter_params``: numel of A, B and the gates) and
  the mean wall time of its optimizer steps (``step_time_s``).

With ``compact=True`` the dead ranks (gates exactly zero) are removed physically between stages
(:func:`sora_dist.core.prune.compact_model`), so later stages train a smaller adapter. The fresh optimizer of the next
stage (and under DeepSpeed its fresh engine, prepared around the smaller adapter; under ZeRO-3 the
live slices are gathered and partitioned again) loses nothing: the moments restart at every stage
anyway. A removed rank can no longer revive in a later stage, as a zero gate can without
compaction.

The score is "higher is better": accuracy for classifiers (Pearson for a regression head), the
generated-answer accuracy of a causal LM when it is evaluated, else exp(-eval_loss).

    schedule = SparsitySchedule(kind="geometric", start=0.05, end=1.0, stages=5, steps_per_stage=200)
    model, rows = run_stages(model, train_set, TrainConfig(lr=2e-4, warmup_steps=20), schedule,
                             accelerator, evaluate, memorize, output_dir="runs/x")
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from ..core.prune import compact_model, physical_adapter_params
from ..core.report import sparsity_report
from ..data.collate import stack_collate
from ..deploy.layout import ADAPTER_DIR, stage_dir
from ..sparsity.config import SparsitySchedule
from ..sparsity.plots import stage_curves
from .config import TrainConfig
from .loop import train
from .trackers import tracker_scalars

SCORES = ("generated_accuracy", "accuracy", "pearson")
COLUMNS = ("stage", "lambda", "steps", "nonzero_params", "live_ranks", "adapter_params", "step_time_s", "score",
           "validation", "train_subset", "generalization", "memorization", "adapter")  # fmt: skip


def stage_config(schedule: SparsitySchedule, base: TrainConfig, stage: int, lambda_: float, output_dir: str | Path) -> TrainConfig:
    """``base`` with this stage's steps, constant λ and folder; a fresh data order per stage.

    No checkpoints and no resume: a stage always starts from the adapter of the previous one.
    """
    return dataclasses.replace(
        base, steps=schedule.steps_per_stage or base.steps, lambda_kind="constant", lambda_start=lambda_,
        lambda_end=None, lambda_steps=0, seed=base.seed + stage, output_dir=str(output_dir),
        save_every=0, resume=False,
    )  # fmt: skip


def score(metrics: dict) -> tuple[str, float]:
    """The "higher is better" number of an evaluation, and its name."""
    for name in SCORES:
        if name in metrics:
            return name, float(metrics[name])
    if "eval_loss" in metrics:
        return "exp(-eval_loss)", math.exp(-float(metrics["eval_loss"]))
    raise ValueError(f"no score in the evaluation metrics {sorted(metrics)}: expected one of {list(SCORES)} or eval_loss")


def relative(value: float, baseline: float) -> float | None:
    """value / baseline × 100; None where the baseline is 0 (e.g. no generated answer right at stage 0)."""
    return 100.0 * value / baseline if baseline > 0 else None


class Recorder:
    """Wraps ``evaluate`` to keep every result of the current stage (train() logs them as well)."""

    def __init__(self, evaluate: Callable[[nn.Module], dict]):
        self.evaluate, self.results = evaluate, []

    def __call__(self, model: nn.Module) -> dict:
        metrics = self.evaluate(model)
        self.results.append(metrics)
        return metrics


def run_stages(
    model: nn.Module,
    dataset,
    base: TrainConfig,
    schedule: SparsitySchedule,
    accelerator,
    evaluate: Callable[[nn.Module], dict],
    memorize: Callable[[nn.Module], dict],
    output_dir: str | Path,
    collate_fn: Callable[[Sequence[dict]], dict] = stack_collate,
    lengths: Sequence[int] | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Train ``model`` through the stages of ``schedule``; returns (model as wrapped, one row per stage).

    ``evaluate`` scores the validation set (its best value during stage 0 is the generalization
    baseline), ``memorize`` a fixed training subset (its end-of-stage-0 value is the memorization
    baseline). Every rank calls this; only the main process writes ``stages.csv``, ``stages.json``
    and ``stages.png`` into ``output_dir``, rewritten after every stage.
    """
    output_dir = Path(output_dir)
    rows: list[dict] = []
    baselines: tuple[float, float] | None = None
    offset = 0  # the stages follow each other in the experiment trackers
    for stage, lambda_ in enumerate(schedule.lambdas()):
        if stage:
            # Back to the bare model: the next train() prepares it with its new optimizer.
            model = accelerator.unwrap_model(model)
            accelerator.free_memory()
            if schedule.compact:
                compact_between_stages(model, stage, accelerator.is_main_process)
        folder = stage_dir(output_dir, stage)
        config = stage_config(schedule, base, stage, lambda_, folder)
        recorder = Recorder(evaluate)
        adapter_params = physical_adapter_params(model)
        timer = StepTimer()
        started = time.perf_counter()
        model, _ = train(model, dataset, config, accelerator, collate_fn=collate_fn, evaluate=recorder, on_step=timer, lengths=lengths,
                         step_offset=offset)  # fmt: skip
        offset += config.steps
        step_time = timer.mean(time.perf_counter() - started, config.steps)
        name, validation = score(recorder.results[-1])
        _, memorized = score(memorize(model))
        if baselines is None:
            baselines = (max(score(m)[1] for m in recorder.results), memorized)
        report = sparsity_report(accelerator.unwrap_model(model))
        rows.append({
            "stage": stage, "lambda": lambda_, "steps": config.steps, "nonzero_params": report.params,
            "live_ranks": report.live_rank, "score": name, "validation": validation, "train_subset": memorized,
            "generalization": relative(validation, baselines[0]), "memorization": relative(memorized, baselines[1]),
            "adapter": str(folder / ADAPTER_DIR), "adapter_params": adapter_params, "step_time_s": step_time,
        })  # fmt: skip
        accelerator.log(tracker_scalars("stage", {k: v for k, v in rows[-1].items() if k != "stage"}), step=offset)
        if accelerator.is_main_process:
            write_stage_reports(rows, output_dir)
            print(f"stage {stage}: lambda {lambda_:.4g}, {report.params:,} non-zero adapter parameters, "
                  f"generalization {_percent(rows[-1]['generalization'])}, memorization {_percent(rows[-1]['memorization'])}", flush=True)
    return model, rows


class StepTimer:
    """``on_step`` callback of train(): the wall-clock time of every optimizer step after the first."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, step, model, optimizer) -> None:
        self.times.append(time.perf_counter())

    def mean(self, total: float, steps: int) -> float:
        """Mean seconds per step between the first and the last step (no setup, final evaluation or
        saving; logging and periodic evaluation included); with one step, ``total / steps``."""
        if len(self.times) >= 2:
            return (self.times[-1] - self.times[0]) / (len(self.times) - 1)
        return total / max(steps, 1)


def compact_between_stages(model: nn.Module, stage: int, main: bool) -> None:
    """Remove the dead ranks before ``stage``; skipped when no rank is live at all (the next stage
    would have nothing to train, while uncompacted zero gates can still revive)."""
    before = physical_adapter_params(model)
    if sparsity_report(model).live_rank == 0:
        if main:
            print(f"stage {stage}: no live rank left, nothing to compact (kept the zero gates)", flush=True)
        return
    removed, _ = compact_model(model)
    if main and removed:
        print(f"stage {stage}: compacted {sum(removed.values())} dead ranks in {len(removed)} modules, "
              f"adapter {before:,} -> {physical_adapter_params(model):,} parameters", flush=True)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def write_stage_reports(rows: list[dict], output_dir: Path) -> None:
    """stages.csv (the COLUMNS of each row) and stages.json (whole rows), one row per stage, and,
    with matplotlib, the curves stages.png."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "stages.csv", "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (output_dir / "stages.json").write_text(json.dumps(rows, indent=2) + "\n")
    try:
        stage_curves(rows, output_dir / "stages.png")
    except ImportError:
        print("matplotlib is not installed: skipped stages.png", flush=True)
