"""The SoRA training loop: the same code under plain PyTorch, DDP and DeepSpeed ZeRO-0/1/2/3.

One optimizer step = ``grad_accum`` micro-batches on every rank. The learning rate and λ follow
optimizer steps, never micro-batches. The gates are updated inside ``SoRAOptimizer.step()``, which
every backend calls after averaging and clipping the gradients (see distributed.py).

    accelerator = build_accelerator(ds_config="ds_configs/zero2.json", mixed_precision="bf16")
    model = AutoModelForCausalLM.from_pretrained(...)   # after the Accelerator: ZeRO-3 loads partitioned
    inject_sora(model, SoRAConfig(r=8))
    train(model, dataset, TrainConfig(steps=1000, lambda_start=0.1), accelerator)

Run it with ``accelerate launch --config_file launch/<x>.yaml``, ``torchrun`` or ``deepspeed``;
``python -m sora_dist.train --help`` is a small command line around it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import distributed
from .inject import SoRAConfig, inject_sora
from .models import load_model
from .io import CONFIG_NAME, _replace_dir, adapter_metadata, save_sora
from .optim import SoRAOptimizer, effective_lambda, gate_groups, sora_param_groups
from .schedule import LambdaSchedule
from .sparsity import sparsity_report

LR_DECAYS = ("constant", "linear", "cosine")
STATE_NAME = "sora_state.json"
ADAPTER_DIR = "adapter"


@dataclasses.dataclass
class TrainConfig:
    """Settings of one training run. Batch sizes are per rank; steps count optimizer steps."""

    steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    gate_lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_decay: str = "linear"
    max_grad_norm: float = 1.0
    gate_update: str = "prox_adam"
    threshold: str = "lr_scaled"
    lambda_kind: str = "constant"
    lambda_start: float = 0.0
    lambda_end: float | None = None
    lambda_steps: int = 0
    seed: int = 0
    output_dir: str | None = None
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = True
    log_every: int = 10
    eval_every: int = 0

    def __post_init__(self):
        for key in ("steps", "micro_batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ValueError(f"TrainConfig.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"TrainConfig.lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"TrainConfig.warmup_steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"TrainConfig.keep_checkpoints must be >= 1 (the newest is what a resume needs), got {self.keep_checkpoints}")
        if self.save_every and not self.output_dir:
            raise ValueError("TrainConfig.save_every needs an output_dir to write checkpoints to")

    def lambda_schedule(self) -> LambdaSchedule:
        return LambdaSchedule(self.lambda_kind, self.lambda_start, self.lambda_end, self.lambda_steps)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of every group's base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up that never starts at 0, then constant, linear or cosine decay towards 0.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / (config.steps - config.warmup_steps)
    if config.lr_decay == "linear":
        return 1.0 - progress
    if config.lr_decay == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def set_learning_rates(optimizer: torch.optim.Optimizer, step: int, config: TrainConfig) -> None:
    """Each group (gates included) follows its own base lr on the shared schedule."""
    factor = lr_factor(step, config)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def build_optimizer(model: nn.Module, config: TrainConfig) -> SoRAOptimizer:
    groups = sora_param_groups(
        model,
        lr=config.lr,
        gate_lr=config.gate_lr,
        weight_decay=config.weight_decay,
        lambda_=config.lambda_start,
        gate_update=config.gate_update,
        threshold=config.threshold,
    )
    for group in groups:
        # An extra group key: it survives DeepSpeed's regrouping like ``sora_gate`` does.
        group["base_lr"] = group["lr"]
    return SoRAOptimizer(groups, lr=config.lr)


def collate(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack equally shaped examples; a causal LM batch without labels predicts its inputs."""
    batch = {key: torch.stack([torch.as_tensor(e[key]) for e in examples]) for key in examples[0]}
    if "labels" not in batch and "input_ids" in batch:
        batch["labels"] = batch["input_ids"]
    return batch


class ShardedBatches:
    """This rank's micro-batches, addressed by (optimizer step, micro-batch): resuming is exact.

    The examples form one stream, reshuffled each epoch from ``seed``. Micro-batch ``m`` of step
    ``s`` is the ``world_size * micro_batch_size`` examples at stream position
    ``(s * grad_accum + m) * world_size * micro_batch_size``; rank r takes the r-th slice. A run on
    one process with ``world_size`` times the micro-batch sees exactly the same examples per step.
    """

    def __init__(self, dataset, micro_batch_size: int, grad_accum: int, rank: int, world_size: int, seed: int, collate_fn=collate):
        if len(dataset) == 0:
            raise ValueError("the training data set is empty")
        self.dataset, self.micro_batch_size, self.grad_accum = dataset, micro_batch_size, grad_accum
        self.collate_fn = collate_fn
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._order: dict[int, torch.Tensor] = {}

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self._order:
            self._order = {epoch: torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._order[epoch][offset])

    def examples_per_step(self) -> int:
        return self.grad_accum * self.world_size * self.micro_batch_size

    def __call__(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        start = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.micro_batch_size
        return self.collate_fn([self.dataset[self._index(p)] for p in range(start, start + self.micro_batch_size)])


def optimizer_step(model, optimizer, batches: ShardedBatches, step: int, accelerator, config: TrainConfig) -> torch.Tensor:
    """Run the ``grad_accum`` micro-batches of one optimizer step; returns this rank's mean loss.

    Under DeepSpeed the last ``accelerator.backward`` performs the step (averaging, clipping, our
    ``SoRAOptimizer.step``); ``optimizer.step()`` is then a no-op. Elsewhere DDP averages during the
    last backward and ``optimizer.step()`` runs after clipping.
    """
    total = torch.zeros((), device=accelerator.device)
    for micro in range(config.grad_accum):
        batch = distributed.to_device(batches(step, micro), accelerator)
        with accelerator.accumulate(model):
            if accelerator.sync_gradients != (micro == config.grad_accum - 1):
                raise RuntimeError(
                    f"Accelerate's accumulation counter is out of step with the loop at step {step}, micro-batch {micro}: "
                    "build the Accelerator with gradient_accumulation_steps=TrainConfig.grad_accum and call "
                    "accelerator.accumulate() nowhere else"
                )
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                distributed.clip_gradients(accelerator, model, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        total += loss.detach().float()
    return total / config.grad_accum


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint; a half-written one (killed mid-save) has no state file yet."""
    done = sorted(p for p in checkpoint_root(output_dir).glob("step-*") if (p / STATE_NAME).is_file())
    return done[-1] if done else None


def save_checkpoint(accelerator, model, output_dir: str | os.PathLike, state: dict, keep: int) -> Path:
    """Write the backend checkpoint plus our state into a temporary folder, then rename it.

    Every rank calls this (DeepSpeed writes a shard per rank); rank 0 renames once all are done,
    so a crash at any point leaves either the old set of checkpoints or the new one. A shared
    filesystem is assumed, as DeepSpeed does.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{state['step']:08d}"
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    distributed.save_state(accelerator, model, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The adapter's description, so that sora-merge / sora-export can read this checkpoint.
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter_metadata(accelerator.unwrap_model(model)), indent=2, sort_keys=True) + "\n")
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        _replace_dir(tmp, final)
        complete = sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file())
        for old in complete[: max(len(complete) - keep, 0)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def run_state(step: int, lambdas: LambdaSchedule, batches: ShardedBatches, accelerator, config: TrainConfig) -> dict:
    """Our part of a checkpoint: where the run is, and what must match for a resume to be exact."""
    return {
        "step": step,
        "examples_seen": step * batches.examples_per_step(),
        "lambda_schedule": lambdas.state_dict(),
        "global_batch_size": batches.examples_per_step(),
        "dataset_size": len(batches.dataset),
        "seed": config.seed,
        "backend": distributed.backend_name(accelerator),
        "world_size": accelerator.num_processes,
    }


def resume(path: Path, accelerator, model, lambdas: LambdaSchedule, batches: ShardedBatches, config: TrainConfig) -> int:
    """Load a checkpoint written by :func:`save_checkpoint`; returns the step to continue from."""
    state = json.loads((path / STATE_NAME).read_text())
    current = run_state(0, lambdas, batches, accelerator, config)
    for key in ("global_batch_size", "dataset_size", "seed", "world_size"):
        if state[key] != current[key]:
            raise ValueError(
                f"{path / STATE_NAME}: cannot resume exactly: {key} was {state[key]} but is now {current[key]}. "
                "Use the same data, seed, number of processes and global batch (micro_batch_size x grad_accum x "
                "processes), or start a fresh output_dir"
            )
    distributed.load_state(accelerator, model, path)
    lambdas.load_state_dict(state["lambda_schedule"])
    return int(state["step"])


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the run stopped before writing anything from that state."""


class FiniteGuard:
    """Remembers, on the device, the first optimizer step whose loss was NaN or inf.

    :meth:`observe` runs every step without a host sync or a collective; :meth:`check` (one scalar
    all-reduce and one sync) runs before anything is logged, evaluated or written, so a checkpoint
    or adapter is never made from a broken state and every rank stops together.
    """

    def __init__(self, accelerator, config: TrainConfig):
        self.accelerator, self.config = accelerator, config
        self.first_bad = torch.zeros((), dtype=torch.long, device=accelerator.device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where((self.first_bad == 0) & bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, step: int) -> None:
        never = torch.full_like(self.first_bad, self.config.steps + 1)
        first = torch.where(self.first_bad > 0, self.first_bad, never)
        if self.accelerator.num_processes > 1:
            first = -self.accelerator.reduce(-first, reduction="max")  # the earliest over all ranks
        first = int(first.item())
        if first <= self.config.steps:
            last = latest_checkpoint(self.config.output_dir) if self.config.output_dir else None
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise NonFiniteLoss(
                f"loss is not finite since optimizer step {first}; at step {step}: stopping; {where}. "
                "Lower train.lr or train.max_grad_norm (or check the data) and resume"
            )


def guard_due(step: int, config: TrainConfig, evaluating: bool) -> bool:
    """Steps at which the loop logs, evaluates, saves or ends: the FiniteGuard checks there."""
    return (
        step == config.steps
        or bool(config.log_every and step % config.log_every == 0)
        or bool(evaluating and config.eval_every and step % config.eval_every == 0)
        or bool(config.save_every and step % config.save_every == 0)
    )


class Progress:
    """tqdm on the main process, the metrics log (JSONL + TensorBoard) in the output folder."""

    def __init__(self, accelerator, config: TrainConfig, start: int):
        from tqdm.auto import tqdm

        from .metrics import MetricsLog

        self.main = accelerator.is_main_process
        self.bar = tqdm(total=config.steps, initial=start, disable=not self.main, desc="train", dynamic_ncols=True)
        self.log = MetricsLog(config.output_dir, enabled=self.main) if config.output_dir else None

    def record(self, step: int, kind: str, values: dict) -> None:
        if self.log is not None:
            self.log.log(step, kind, values)
        if self.main and kind == "train":
            self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in values.items()}, refresh=False)
        elif self.main:
            self.bar.write(f"step {step} {kind}: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()))

    def close(self) -> None:
        self.bar.close()
        if self.log is not None:
            self.log.close()


def train_metrics(accelerator, model, optimizer, loss: torch.Tensor) -> dict:
    """Every rank calls this: the loss average and the ZeRO-3 gate gather are collectives."""
    mean_loss = accelerator.reduce(loss, reduction="mean").item()
    report = sparsity_report(accelerator.unwrap_model(model))
    gate = gate_groups(optimizer)[0]
    adapter = next((g for g in optimizer.param_groups if not g.get("sora_gate")), gate)
    return {
        "loss": mean_loss,
        "lr": adapter["lr"],
        "gate_lr": gate["lr"],
        "lambda": effective_lambda(gate),
        "live_ranks": report.live_rank,
        "adapter_params": report.params,
    }


def write_final_report(accelerator, model, output_dir: Path) -> None:
    """Sparsity report (JSON) and the rank-per-layer heatmap (PNG, when matplotlib is installed)."""
    report = sparsity_report(accelerator.unwrap_model(model))
    if not accelerator.is_main_process:
        return
    (output_dir / "sparsity.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    try:
        from .plots import rank_heatmap
    except ImportError:
        return
    try:
        rank_heatmap(report, output_dir / "rank_heatmap.png")
    except ImportError:
        print("matplotlib is not installed: skipped rank_heatmap.png", flush=True)


def train(
    model: nn.Module,
    dataset,
    config: TrainConfig,
    accelerator,
    on_step: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
    collate_fn: Callable[[Sequence[dict]], dict] = collate,
    evaluate: Callable[[nn.Module], dict] | None = None,
    lambdas=None,
):
    """Train the SoRA adapter of ``model`` on ``dataset`` (a sequence of example dicts).

    Resumes from the newest checkpoint in ``config.output_dir`` when one exists and
    ``config.resume``; writes checkpoints every ``save_every`` steps, and at the end the adapter
    (``output_dir/adapter``), ``sparsity.json`` and ``rank_heatmap.png``. ``collate_fn`` turns a
    micro-batch of examples into tensors; ``evaluate(model) -> metrics`` runs on every rank every
    ``eval_every`` steps and at the end. ``on_step(step, model, optimizer)`` runs after each
    optimizer step on every rank. A NaN/inf loss stops the run (:class:`NonFiniteLoss`). Returns
    the backend-wrapped (model, optimizer). ``lambdas`` replaces ``config.lambda_schedule()``: any
    object with its interface, e.g. a budget.BudgetController (λ chosen from the live count).
    """
    if accelerator.gradient_accumulation_steps != config.grad_accum:
        raise ValueError(
            f"the Accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches but "
            f"TrainConfig.grad_accum is {config.grad_accum}: pass grad_accum= to build_accelerator"
        )
    optimizer = build_optimizer(model, config)
    lambdas = config.lambda_schedule() if lambdas is None else lambdas
    model, wrapped = distributed.prepare(accelerator, model, optimizer, config.micro_batch_size, config.max_grad_norm)
    batches = ShardedBatches(dataset, config.micro_batch_size, config.grad_accum, accelerator.process_index, accelerator.num_processes, config.seed, collate_fn)
    step = 0
    found = latest_checkpoint(config.output_dir) if config.output_dir and config.resume else None
    if found is not None:
        step = resume(found, accelerator, model, lambdas, batches, config)
        if accelerator.is_main_process:
            print(f"resumed from {found} at step {step}", flush=True)
    progress = Progress(accelerator, config, step)
    guard = FiniteGuard(accelerator, config)
    try:
        while step < config.steps:
            set_learning_rates(optimizer, step, config)
            lambdas.apply(optimizer)
            loss = optimizer_step(model, wrapped, batches, step, accelerator, config)
            lambdas.step(optimizer)
            step += 1
            guard.observe(loss, step)
            if guard_due(step, config, evaluate is not None):
                guard.check(step)
            progress.bar.update(1)
            if config.log_every and (step % config.log_every == 0 or step == config.steps):
                progress.record(step, "train", train_metrics(accelerator, model, optimizer, loss))
            if evaluate is not None and config.eval_every and step % config.eval_every == 0 and step < config.steps:
                progress.record(step, "eval", evaluate(model))
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                save_checkpoint(accelerator, model, config.output_dir, run_state(step, lambdas, batches, accelerator, config), config.keep_checkpoints)
            if on_step is not None:
                on_step(step, model, wrapped)
        if evaluate is not None:
            progress.record(step, "eval", evaluate(model))
    finally:
        progress.close()
    if config.output_dir:
        save_sora(accelerator.unwrap_model(model), Path(config.output_dir) / ADAPTER_DIR, extra={"train": dataclasses.asdict(config)})
        write_final_report(accelerator, model, Path(config.output_dir))
    return model, wrapped


def load_causal_lm(path: str, load_in_4bit: bool = False, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM (nf4 when ``load_in_4bit``, stored as ``dtype``: the training dtype under ZeRO-3)."""
    return load_model(path, "causal_lm", dtype, "4bit" if load_in_4bit else "none", compute_dtype=dtype)


def read_token_blocks(path: str | os.PathLike, seq_len: int, tokenizer_name: str | None = None) -> list[dict[str, torch.Tensor]]:
    """Fixed-length training blocks from a JSONL file of {"input_ids": [...]} or {"text": "..."} lines.

    All tokens are concatenated (text is tokenized with ``tokenizer_name``'s tokenizer, with EOS
    between documents) and cut into ``seq_len`` blocks; the remainder is dropped.
    """
    ids: list[int] = []
    tokenizer = None
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON: {err.msg}") from err
            if "input_ids" in record:
                ids.extend(int(t) for t in record["input_ids"])
            elif "text" in record and tokenizer_name is not None:
                if tokenizer is None:
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
                ids.extend(tokenizer(record["text"])["input_ids"] + [tokenizer.eos_token_id])
            else:
                raise ValueError(f'{path}:{number}: each line needs "input_ids" (or "text", given a tokenizer)')
    if len(ids) < seq_len:
        raise ValueError(f"{path}: {len(ids)} tokens in all, fewer than one block of seq_len={seq_len}")
    blocks = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    return [{"input_ids": block} for block in blocks]


def _arg_type(annotation: str):
    """argparse type for a TrainConfig field from its annotation ("float | None" -> float)."""
    base = annotation.split("|")[0].strip()
    if base == "bool":
        return lambda text: text.lower() in ("1", "true", "yes")
    return {"int": int, "float": float}.get(base, str)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sora_dist.train", description="Train a SoRA adapter for a causal LM.")
    parser.add_argument("--model", required=True, help="base model folder or hub id")
    parser.add_argument("--data", required=True, help='JSONL with {"input_ids": [...]} or {"text": ...} per line')
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--ds-config", help="DeepSpeed JSON (for torchrun/deepspeed launches; accelerate launch passes its own)")
    parser.add_argument("--mixed-precision", choices=distributed.MIXED_PRECISIONS)
    parser.add_argument("--load-in-4bit", action="store_true", help="nf4 base with bf16 storage (works under ZeRO-3)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--target-modules", default="all-linear")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    for field in dataclasses.fields(TrainConfig):
        if field.name != "output_dir":
            parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=_arg_type(field.type), default=field.default)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "output_dir"}, output_dir=args.output_dir)
    accelerator = distributed.build_accelerator(args.ds_config, args.mixed_precision, config.grad_accum)
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" and (args.load_in_4bit or distributed.uses_deepspeed(accelerator)) else torch.float32
    model = load_causal_lm(args.model, args.load_in_4bit, dtype)
    torch.manual_seed(config.seed)
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    inject_sora(model, SoRAConfig(r=args.r, alpha=args.alpha, target_modules=targets), verbose=accelerator.is_main_process)
    dataset = read_token_blocks(args.data, args.seq_len, tokenizer_name=args.model)
    try:
        model, _ = train(model, dataset, config, accelerator)
        report = sparsity_report(accelerator.unwrap_model(model))
        if accelerator.is_main_process:
            print(report.table(), flush=True)
    finally:
        distributed.end_of_run()


if __name__ == "__main__":
    sys.exit(main())
