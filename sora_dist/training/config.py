"""The ``train`` section of a run: every value checked here, before anything heavy loads."""

from __future__ import annotations

import dataclasses
import math

from ..backends.optimizers import OPTIMIZERS
from ..core.config import GATE_UPDATES, THRESHOLDS
from ..options import ConfigError, choice, option
from ..sparsity.config import check_lambda_ramp
from .trackers import normalize_report_to

LR_DECAYS = ("constant", "linear", "cosine")


FLOAT32_MAX = 3.4028234663852886e38  # rates and norms are float32 tensors' factors on the device
MAX_COUNT = 10**9  # steps, micro-batch size, accumulation: beyond any run (a bigger value is a typo)


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run. Batch sizes are per rank; steps count optimizer steps."""

    steps: int = option(100, "optimizer steps (not micro-batches); or give epochs")
    epochs: float = option(0.0, "passes over the training set instead of steps (steps = ceil(epochs x examples / global batch))")
    micro_batch_size: int = option(8, "examples per micro-batch per process")
    grad_accum: int = option(1, "micro-batches per optimizer step; global batch = micro_batch_size x grad_accum x processes")
    lr: float = option(2e-4, "peak learning rate of A, B (and modules_to_save)")
    gate_lr: float | None = option(
        None, "peak learning rate of the gates (default: train.lr; in budget mode one chosen from the budget, see sparsity_budget.lambda_max)"
    )
    weight_decay: float = option(0.0, "AdamW weight decay of A and B (never the gates); it pins the g <-> A, B scale")
    normalize_factors: bool = option(
        False, "after each step, scale each rank's row of A and column of B to norm 1 and move the norms into its gate "
        "(the update is unchanged), so |g| is the rank's contribution: the threshold and budget mode rank by it (not under ZeRO-3)"
    )
    gate_l1: float = option(
        0.0, "the released code's second L1 term: adds gate_l1 x sum|g| / n_gates to the loss, through Adam (its sparse_lambda, e.g. 10)"
    )
    warmup_steps: int = option(0, "linear warm-up steps of both learning rates")
    lr_decay: str = option("linear", "constant | linear | cosine decay after warm-up")
    max_grad_norm: float = option(1.0, "global gradient-norm clipping (0 = off)")
    loss_chunk_tokens: int | None = option(
        None, "causal LM: the output layer and cross-entropy run on this many labelled tokens at a time, so full-vocabulary "
        "logits never exist (training and evaluation; exact); default: about 16M logits per chunk (341 tokens of a 49k "
        "vocabulary, 64 of a 262k one); 0 = from full logits"
    )
    optimizer: str = option(
        "adamw_torch",
        "inner optimizer of A and B (and Adam gates): adamw_torch | adamw_torch_fused | adamw_8bit | paged_adamw_8bit | "
        "paged_adamw_32bit (bitsandbytes) | sgd; under DeepSpeed optimizer offload, adamw_* use DeepSpeed's CPU Adam",
    )
    gate_update: str = option("prox_adam", "prox_adam (released code) | prox_sgd (paper)")
    threshold: str = option("lr_scaled", "lr_scaled (tau = lr x lambda, the paper) | fixed (tau = lambda)")
    lambda_kind: str = option("constant", "constant | linear | geometric ramp of lambda")
    lambda_start: float = option(
        0.0, "sparsity strength lambda at step 0 (prox_adam + lr_scaled: lambda > 1 eventually kills every gate)"
    )
    lambda_end: float | None = option(None, "lambda at the end of the ramp")
    lambda_steps: int = option(0, "optimizer steps of the ramp")
    seed: int = option(0, "seed of the adapters, data order and dropout")
    output_dir: str | None = option(None, "where checkpoints, metrics.jsonl, the adapter and the reports go (under runs/)")
    save_every: int = option(0, "checkpoint every N steps (0 = never); written atomically")
    keep_checkpoints: int = option(2, "how many checkpoints to keep")
    resume: bool = option(True, "continue from the newest checkpoint in output_dir if there is one")
    log_every: int = option(10, "log loss, lr, lambda and live ranks every N steps")
    eval_every: int = option(0, "evaluate every N steps (0 = only at the end)")
    report_to: list[str] | str | None = option(
        None, "experiment trackers, through Accelerate: one or a list of tensorboard | wandb | mlflow | trackio, or none; "
        "each gets the run config, every logged metric and the rank heatmap (default: tensorboard when it is installed; "
        "metrics.jsonl is always written)",
    )
    tracker_project: str = option("sora-dist", "W&B / trackio project and MLflow experiment of the run (its run name is output_dir's folder name)")

    def __post_init__(self):
        for key in ("steps", "micro_batch_size", "grad_accum"):
            if not 1 <= getattr(self, key) <= MAX_COUNT:
                raise ConfigError(f"TrainConfig.{key}: must be in [1, {MAX_COUNT:.0e}], got {getattr(self, key)}")
        for key in ("lr", "gate_lr", "weight_decay", "max_grad_norm", "gate_l1"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and 0 <= value <= FLOAT32_MAX):
                raise ConfigError(f"TrainConfig.{key}: must be a finite number in [0, {FLOAT32_MAX:.2e}] (float32), got {value}")
        if not (math.isfinite(self.epochs) and self.epochs >= 0):
            raise ConfigError(f"TrainConfig.epochs: must be a finite number >= 0, got {self.epochs}")
        for key in ("save_every", "log_every", "eval_every", "lambda_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"TrainConfig.{key}: must be >= 0, got {getattr(self, key)}")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 0:
            raise ConfigError(f"TrainConfig.loss_chunk_tokens: must be >= 0 (0: from full logits), got {self.loss_chunk_tokens}")
        choice("TrainConfig.lr_decay", self.lr_decay, LR_DECAYS)
        choice("TrainConfig.gate_update", self.gate_update, GATE_UPDATES)
        choice("TrainConfig.optimizer", self.optimizer, OPTIMIZERS)
        choice("TrainConfig.threshold", self.threshold, THRESHOLDS)
        self.report_to = normalize_report_to(self.report_to)
        if not self.tracker_project.strip():
            raise ConfigError("TrainConfig.tracker_project: must not be empty")
        # With epochs, steps is known once the data is (recipe.steps_from_epochs checks again then).
        if self.warmup_steps < 0 or (not self.epochs and self.warmup_steps >= self.steps):
            raise ConfigError(f"TrainConfig.warmup_steps: must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"TrainConfig.keep_checkpoints: must be >= 1 (the newest is what a resume needs), got {self.keep_checkpoints}")
        if self.save_every and not self.output_dir:
            raise ConfigError("TrainConfig.save_every: needs an output_dir to write checkpoints to")
        check_lambda_ramp(self.lambda_kind, self.lambda_start, self.lambda_end, self.lambda_steps, key="TrainConfig.lambda")
