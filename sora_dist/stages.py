"""The sparsifying scheduler (SORA.md, Algorithm 1): λ rises through K stages, each a full training run.

Stage k trains the adapter left by stage k-1 with a constant λ_k and its own warm-up/decay
learning-rate schedule (the released code reused schedulers that were already exhausted, so later
stages ran at lr 0). Each stage is one call of :func:`sora_dist.train.train` with a fresh
optimizer: the Adam moments restart at every stage, the adapter carries over. After a stage we
record

- generalization = validation score / best stage-0 validation score × 100
- memorization   = score on a fixed training subset / its stage-0 value × 100
- the number of non-zero adapter parameters, and the stage's adapter (``stages/stage-k/adapter``).

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
from pathlib import Path
from typing import Callable, Sequence

from torch import nn

from .plots import stage_curves
from .sparsity import sparsity_report
from .train import ADAPTER_DIR, TrainConfig, collate, train

KINDS = ("linear", "geometric", "list")
SCORES = ("generated_accuracy", "accuracy", "pearson")
COLUMNS = ("stage", "lambda", "steps", "nonzero_params", "live_ranks", "score", "validation", "train_subset",
           "generalization", "memorization", "adapter")  # fmt: skip


@dataclasses.dataclass
class SparsitySchedule:
    """λ_0 ≤ λ_1 ≤ ... ≤ λ_{K-1}: ``stages`` values spaced linearly or geometrically from ``start``
    to ``end``, or the explicit ``values``. ``steps_per_stage`` None takes ``train.steps``."""

    kind: str = "linear"
    start: float | None = None
    end: float | None = None
    stages: int | None = None
    values: list[float] | None = None
    steps_per_stage: int | None = None
    train_subset: int = 128

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: must be one of {list(KINDS)}, got {self.kind!r}")
        if self.kind == "list":
            self._check_list()
        else:
            self._check_spacing()
        if self.steps_per_stage is not None and self.steps_per_stage < 1:
            raise ValueError(f"steps_per_stage: must be >= 1, got {self.steps_per_stage}")
        if self.train_subset < 1:
            raise ValueError(f"train_subset: must be >= 1 training examples, got {self.train_subset}")

    def _check_list(self) -> None:
        for key in ("start", "end", "stages"):
            if getattr(self, key) is not None:
                raise ValueError(f"{key}: not used with kind=list (the stages are the entries of values)")
        if not self.values:
            raise ValueError("values: kind=list needs a non-empty list of lambdas, e.g. [0.1, 0.3, 1.0]")
        if any(v < 0 for v in self.values) or list(self.values) != sorted(self.values):
            raise ValueError(f"values: lambdas must be >= 0 and non-decreasing (lambda rises through the stages), got {self.values}")

    def _check_spacing(self) -> None:
        if self.values is not None:
            raise ValueError(f"values: only used with kind=list, not kind={self.kind}")
        for key in ("start", "end", "stages"):
            if getattr(self, key) is None:
                raise ValueError(f"{key}: required with kind={self.kind}")
        if self.kind == "geometric" and self.start <= 0:
            raise ValueError(f"start: must be > 0 for a geometric spacing, got {self.start}")
        if self.start < 0:
            raise ValueError(f"start: lambda must be >= 0, got {self.start}")
        if self.end < self.start:
            raise ValueError(f"end: must be >= start={self.start} (lambda rises through the stages), got {self.end}")
        if self.stages < 1:
            raise ValueError(f"stages: must be >= 1, got {self.stages}")

    def lambdas(self) -> list[float]:
        if self.kind == "list":
            return [float(v) for v in self.values]
        if self.stages == 1:
            return [float(self.start)]
        fractions = [k / (self.stages - 1) for k in range(self.stages)]
        if self.kind == "linear":
            return [self.start + (self.end - self.start) * f for f in fractions]
        return [self.start * (self.end / self.start) ** f for f in fractions]

    def stage_config(self, base: TrainConfig, stage: int, lambda_: float, output_dir: str | Path) -> TrainConfig:
        """``base`` with this stage's steps, constant λ and folder; a fresh data order per stage.

        No checkpoints and no resume: a stage always starts from the adapter of the previous one.
        """
        return dataclasses.replace(
            base, steps=self.steps_per_stage or base.steps, lambda_kind="constant", lambda_start=lambda_,
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
    collate_fn: Callable[[Sequence[dict]], dict] = collate,
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
    for stage, lambda_ in enumerate(schedule.lambdas()):
        if stage:
            # Back to the bare model: the next train() prepares it with its new optimizer.
            model = accelerator.unwrap_model(model)
            accelerator.free_memory()
        stage_dir = output_dir / "stages" / f"stage-{stage}"
        config = schedule.stage_config(base, stage, lambda_, stage_dir)
        recorder = Recorder(evaluate)
        model, _ = train(model, dataset, config, accelerator, collate_fn=collate_fn, evaluate=recorder)
        name, validation = score(recorder.results[-1])
        _, memorized = score(memorize(model))
        if baselines is None:
            baselines = (max(score(m)[1] for m in recorder.results), memorized)
        report = sparsity_report(accelerator.unwrap_model(model))
        rows.append({
            "stage": stage, "lambda": lambda_, "steps": config.steps, "nonzero_params": report.params,
            "live_ranks": report.live_rank, "score": name, "validation": validation, "train_subset": memorized,
            "generalization": relative(validation, baselines[0]), "memorization": relative(memorized, baselines[1]),
            "adapter": str(stage_dir / ADAPTER_DIR),
        })  # fmt: skip
        if accelerator.is_main_process:
            write_stage_reports(rows, output_dir)
            print(f"stage {stage}: lambda {lambda_:.4g}, {report.params:,} non-zero adapter parameters, "
                  f"generalization {_percent(rows[-1]['generalization'])}, memorization {_percent(rows[-1]['memorization'])}", flush=True)
    return model, rows


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def write_stage_reports(rows: list[dict], output_dir: Path) -> None:
    """stages.csv and stages.json (one row per stage) and, with matplotlib, the curves stages.png."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "stages.csv", "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (output_dir / "stages.json").write_text(json.dumps(rows, indent=2) + "\n")
    try:
        stage_curves(rows, output_dir / "stages.png")
    except ImportError:
        print("matplotlib is not installed: skipped stages.png", flush=True)
