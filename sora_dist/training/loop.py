"""The SoRA training loop: the same code under plain PyTorch, DDP and DeepSpeed ZeRO-0/1/2/3.

One optimizer step = ``grad_accum`` micro-batches on every rank. The learning rate and λ follow
optimizer steps, never micro-batches. The gates are updated inside ``SoRAOptimizer.step()``, which
every backend calls after averaging and clipping the gradients (see backends/accelerate.py).

    accelerator = build_accelerator(ds_config="ds_configs/zero2.json", mixed_precision="bf16")
    model = AutoModelForCausalLM.from_pretrained(...)   # after the Accelerator: ZeRO-3 loads partitioned
    inject_sora(model, SoRAConfig(r=8))
    train(model, dataset, TrainConfig(steps=1000, lambda_start=0.1), accelerator)

``sora-train`` (sora_dist/recipe.py) composes this with data, model loading and reports.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import accelerate as engine
from ..backends.optimizers import inner_optimizer
from ..core.balance import factor_roles, use_zero_layout
from ..core.optim import GATE_FLAG, SoRAOptimizer, mark_sharded, sora_param_groups
from ..data.collate import stack_collate
from ..data.formats import IGNORE
from ..deploy.io import save_sora
from ..deploy.layout import adapter_dir, latest_checkpoint
from ..sparsity.controller import LambdaController
from ..sparsity.schedule import LambdaSchedule
from .batches import ShardedBatches
from .checkpoint import resume, run_state, save_checkpoint
from .chunked_loss import DEFAULT_CHUNK_TOKENS, row_token_losses
from .config import TrainConfig
from .guard import FiniteGuard, guard_due
from .lr import set_learning_rates
from .progress import Progress, train_metrics, write_final_report


def build_optimizer(model: nn.Module, config: TrainConfig, accelerator=None) -> SoRAOptimizer:
    """The SoRA optimizer around ``config.optimizer`` (DeepSpeed's CPU Adam under optimizer offload)."""
    offload = accelerator is not None and engine.offloads_optimizer(engine.engine_ds_config(accelerator))
    inner, inner_kwargs = inner_optimizer(config.optimizer, offload)
    groups = sora_param_groups(
        model,
        lr=config.lr,
        gate_lr=config.gate_lr,
        weight_decay=config.weight_decay,
        lambda_=config.lambda_start,
        gate_update=config.gate_update,
        threshold=config.threshold,
        gate_l1=config.gate_l1,
        normalize_factors=config.normalize_factors,
    )
    return SoRAOptimizer(groups, lr=config.lr, inner=inner, **inner_kwargs)


def prepare(accelerator, model: nn.Module, optimizer: SoRAOptimizer, config: TrainConfig):
    """The backend's ``prepare`` for a SoRA model and its optimizer, with the checks that matter.

    Fails loudly if the optimizer that the backend will step is not our SoRAOptimizer or lost its
    gate group: the released SoRA code trained with its gate optimizer silently never stepped
    under DeepSpeed.
    """
    if not isinstance(optimizer, SoRAOptimizer):
        raise TypeError(f"prepare() needs a SoRAOptimizer (the gates are updated inside its step()), got {type(optimizer).__name__}")
    if config.normalize_factors and engine.zero_stage(accelerator) == 3:
        raise ValueError("train.normalize_factors: not available under ZeRO-3 (each parameter is partitioned on its own); use ZeRO-2")
    mark_sharded(optimizer, bool(engine.zero_stage(accelerator)) or engine.uses_fsdp2(accelerator))
    model, wrapped = engine.prepare(accelerator, model, optimizer, config.micro_batch_size, config.max_grad_norm)
    stepped = engine.client_optimizer(wrapped)
    backend = engine.backend_name(accelerator)
    if config.normalize_factors and engine.zero_stage(accelerator) in (1, 2):
        layouts = engine.zero12_flat_layouts(wrapped)
        if layouts is None or len(layouts) != len(optimizer.param_groups):
            raise RuntimeError("train.normalize_factors: cannot read the ZeRO-1/2 flat layout of this DeepSpeed version")
        use_zero_layout(optimizer.param_groups, layouts, factor_roles(accelerator.unwrap_model(model)))
        optimizer.after_factor_step = engine.zero12_copy_to_model(wrapped)
    if stepped is not optimizer:
        raise RuntimeError(
            f"the {backend} backend replaced the SoRA optimizer by {type(stepped).__name__}; the gates would never "
            'be thresholded. With ZeRO-Offload set "zero_force_ds_cpu_optimizer": false in the DeepSpeed config'
        )
    if not gate_shard_numel(wrapped, stepped) and not engine.uses_fsdp2(accelerator):  # FSDP2: a rank may hold no gate row
        raise RuntimeError(
            f"the {backend} backend gives the SoRA optimizer no gate to step on rank {accelerator.process_index}: "
            f"its gate group ({GATE_FLAG}=True) is missing or empty"
        )
    return model, wrapped


def gate_shard_numel(wrapped, optimizer: SoRAOptimizer) -> int:
    """How many gate elements this rank's optimizer steps (its shard under ZeRO-1/2/3)."""
    return engine.shard_numel(wrapped, optimizer, {i for i, g in enumerate(optimizer.param_groups) if g.get(GATE_FLAG)})


def lambda_schedule(config: TrainConfig) -> LambdaSchedule:
    """The λ ramp of ``config.lambda_*``."""
    return LambdaSchedule(config.lambda_kind, config.lambda_start, config.lambda_end, config.lambda_steps)


def token_level(batch: dict) -> bool:
    """A causal LM batch (one label per token) rather than one label per example."""
    labels = batch.get("labels")
    return labels is not None and labels.dim() == 2


def loss_scale(micro_batches: list[dict], accelerator) -> torch.Tensor:
    """(processes x micro-batches) / target tokens of the whole optimizer step, over every rank.

    The backend divides each micro-batch's loss by the micro-batches (Accelerate or DeepSpeed) and
    averages the gradients over the processes (DDP, ZeRO); scaling each micro-batch's summed token
    loss by this factor makes the step's gradient the mean over all its target tokens, whatever the
    split into micro-batches and ranks. One all-reduce per step, no host sync.
    """
    local = sum((batch["labels"][:, 1:] != IGNORE).sum() for batch in micro_batches)
    total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    return (accelerator.num_processes * len(micro_batches)) / total.clamp_min(1).float()


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over the labelled tokens of each row (training and evaluation)."""
    shifted = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE, reduction="none")
    return losses.view(shifted.shape).sum(-1)


def summed_token_loss(model, batch: dict, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Sum of the next-token cross-entropy over the labelled tokens of ``batch`` (chunked: no
    full-vocabulary logits, training/chunked_loss.py; ``chunk_tokens`` 0: from the logits)."""
    return row_token_losses(model, batch, chunk_tokens, token_losses).sum()


def optimizer_step(model, optimizer, batches: ShardedBatches, step: int, accelerator, config: TrainConfig) -> torch.Tensor:
    """Run the ``grad_accum`` micro-batches of one optimizer step; returns this rank's share of the
    step's loss (its mean over the ranks is the step's loss).

    Causal LM data: the loss of the step is the sum of its token losses over every micro-batch and
    rank divided by its target tokens (:func:`loss_scale`). Classification: the mean over the
    examples of the global batch (every micro-batch has the same number of examples).

    Under DeepSpeed the last ``accelerator.backward`` performs the step (averaging, clipping, our
    ``SoRAOptimizer.step``); ``optimizer.step()`` is then a no-op. Elsewhere DDP averages during the
    last backward and ``optimizer.step()`` runs after clipping.
    """
    micro_batches = [engine.to_device(batches(step, micro), accelerator) for micro in range(config.grad_accum)]
    scale = loss_scale(micro_batches, accelerator) if token_level(micro_batches[0]) else None
    total = torch.zeros((), device=accelerator.device)
    for micro, batch in enumerate(micro_batches):
        with accelerator.accumulate(model):
            if accelerator.sync_gradients != (micro == config.grad_accum - 1):
                raise RuntimeError(
                    f"Accelerate's accumulation counter is out of step with the loop at step {step}, micro-batch {micro}: "
                    "build the Accelerator with gradient_accumulation_steps=TrainConfig.grad_accum and call "
                    "accelerator.accumulate() nowhere else"
                )
            loss = model(**batch).loss if scale is None else summed_token_loss(model, batch, config.loss_chunk_tokens) * scale
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                engine.clip_gradients(accelerator, model, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        total += loss.detach().float()
    return total / config.grad_accum


def train(
    model: nn.Module,
    dataset,
    config: TrainConfig,
    accelerator,
    on_step: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
    collate_fn: Callable[[Sequence[dict]], dict] = stack_collate,
    evaluate: Callable[[nn.Module], dict] | None = None,
    lambdas: LambdaController | None = None,
    lengths: Sequence[int] | None = None,
    step_offset: int = 0,
):
    """Train the SoRA adapter of ``model`` on ``dataset`` (a sequence of example dicts).

    Resumes from the newest checkpoint in ``config.output_dir`` when one exists and
    ``config.resume``; writes checkpoints every ``save_every`` steps, and at the end the adapter
    (``output_dir/adapter``), ``sparsity.json`` and ``rank_heatmap.png``. ``collate_fn`` turns a
    micro-batch of examples into tensors; ``evaluate(model) -> metrics`` runs on every rank every
    ``eval_every`` steps and at the end. ``on_step(step, model, optimizer)`` runs after each
    optimizer step on every rank. A NaN/inf loss stops the run (:class:`NonFiniteLoss`). Returns
    the backend-wrapped (model, optimizer). ``lambdas`` replaces the ramp of ``config.lambda_*``:
    any LambdaController, e.g. a BudgetController (λ chosen from the live count). ``lengths`` (one
    per example) turns on length-grouped batching. Metrics go to ``metrics.jsonl`` and to the
    Accelerator's experiment trackers (``accelerator.log``, at ``step_offset + step``: a staged run's
    stages follow each other there), with the rank heatmap at each evaluation and at the end.
    """
    if accelerator.gradient_accumulation_steps != config.grad_accum:
        raise ValueError(
            f"the Accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches but "
            f"TrainConfig.grad_accum is {config.grad_accum}: pass grad_accum= to build_accelerator"
        )
    optimizer = build_optimizer(model, config, accelerator)
    lambdas = lambda_schedule(config) if lambdas is None else lambdas
    model, wrapped = prepare(accelerator, model, optimizer, config)
    batches = ShardedBatches(dataset, config.micro_batch_size, config.grad_accum, accelerator.process_index, accelerator.num_processes,
                             config.seed, collate_fn, lengths)  # fmt: skip
    step = 0
    found = latest_checkpoint(config.output_dir) if config.output_dir and config.resume else None
    if found is not None:
        step = resume(found, accelerator, model, lambdas, batches, config, wrapped)
        if accelerator.is_main_process:
            print(f"resumed from {found} at step {step}", flush=True)
    progress = Progress(accelerator, config, step, step_offset)
    guard = FiniteGuard(accelerator, config, model)
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
                progress.heatmap(model, step)
            if config.save_every and step % config.save_every == 0 and step < config.steps:
                save_checkpoint(accelerator, model, config.output_dir, run_state(step, lambdas, batches, accelerator, config), config.keep_checkpoints,
                                wrapped)  # fmt: skip
            if on_step is not None:
                on_step(step, model, wrapped)
        if evaluate is not None:
            progress.record(step, "eval", evaluate(model))
    finally:
        progress.close()
    if config.output_dir:
        save_sora(accelerator.unwrap_model(model), adapter_dir(config.output_dir), extra={"train": dataclasses.asdict(config)})
        write_final_report(accelerator, model, Path(config.output_dir), tracker_step=step_offset + step)
    return model, wrapped
