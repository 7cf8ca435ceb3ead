"""Checkpoints of a run: written atomically by every rank, resumed exactly or refused clearly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..backends import accelerate as engine
from ..deploy.atomic import replace_dir
from ..deploy.io import adapter_metadata, write_metadata
from ..deploy.layout import STATE_NAME, checkpoint_dir, complete_checkpoints
from ..sparsity.controller import LambdaController
from .batches import ShardedBatches
from .config import TrainConfig


def save_checkpoint(accelerator, model, output_dir: str | os.PathLike, state: dict, keep: int, optimizer=None) -> Path:
    """Write the backend checkpoint plus our state into a temporary folder, then rename it.

    Every rank calls this (DeepSpeed writes a shard per rank); rank 0 renames once all are done,
    so a crash at any point leaves either the old set of checkpoints or the new one. A shared
    filesystem is assumed, as DeepSpeed does.
    """
    final = checkpoint_dir(output_dir, state["step"])
    tmp = final.with_name(f".{final.name}.tmp")  # one name every rank knows
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    engine.save_state(accelerator, model, tmp, optimizer)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The adapter's description, so that sora-merge / sora-export can read this checkpoint.
        write_metadata(tmp, adapter_metadata(accelerator.unwrap_model(model)))
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, final)
        complete = complete_checkpoints(output_dir)
        for old in complete[: max(len(complete) - keep, 0)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def run_state(step: int, lambdas: LambdaController, batches: ShardedBatches, accelerator, config: TrainConfig) -> dict:
    """Our part of a checkpoint: where the run is, and what must match for a resume to be exact."""
    return {
        "step": step,
        "examples_seen": step * batches.examples_per_step(),
        "lambda_schedule": lambdas.state_dict(),
        "global_batch_size": batches.examples_per_step(),
        "dataset_size": len(batches.dataset),
        "seed": config.seed,
        "backend": engine.backend_name(accelerator),
        "world_size": accelerator.num_processes,
    }


def resume(path: Path, accelerator, model, lambdas: LambdaController, batches: ShardedBatches, config: TrainConfig, optimizer=None) -> int:
    """Load a checkpoint written by :func:`save_checkpoint`; returns the step to continue from."""
    state = json.loads((path / STATE_NAME).read_text())
    current = run_state(0, lambdas, batches, accelerator, config)
    # FSDP2's checkpoint is resharded by DCP onto any number of processes; the examples of each step
    # depend only on the global batch (training/batches.py), so there only the global batch must match.
    reshardable = state.get("backend") == current["backend"] == "fsdp2"
    keys = ("global_batch_size", "dataset_size", "seed") + (() if reshardable else ("world_size",))
    for key in keys:
        if state[key] != current[key]:
            raise ValueError(
                f"{path / STATE_NAME}: cannot resume exactly: {key} was {state[key]} but is now {current[key]}. "
                "Use the same data, seed, number of processes and global batch (micro_batch_size x grad_accum x "
                "processes), or start a fresh output_dir"
            )
    if reshardable and state["world_size"] != current["world_size"] and accelerator.is_main_process:
        print(f"resuming on {current['world_size']} processes from a checkpoint of {state['world_size']}: the sharded state is "
              "redistributed; the same examples per step, but dropout draws other random numbers", flush=True)  # fmt: skip
    engine.load_state(accelerator, model, path, optimizer)
    lambdas.load_state_dict(state["lambda_schedule"])
    return int(state["step"])
