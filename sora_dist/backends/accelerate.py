"""Backend details for the training loop: plain PyTorch, DDP, DeepSpeed ZeRO-0/1/2/3 and FSDP2 via Accelerate.

The SoRA math never changes between backends. What changes is where tensors live and who steps
the optimizer:

- plain PyTorch and DDP: ``optimizer.step()`` runs the SoRA optimizer on whole
  tensors after DDP averaged the gradients and we clipped them;
- DeepSpeed: ``accelerator.backward()`` runs the engine's step, which averages (all-reduce or
  reduce-scatter), clips, and then calls our optimizer's ``step()`` on whole tensors (ZeRO-0) or on
  this rank's flat fp32 shard of each param group (ZeRO-1/2/3). The gate group keeps its
  ``sora_gate`` key there, so the proximal step runs on the gate shard with no extra collective;
- FSDP2 (backends/fsdp2.py): ``optimizer.step()`` runs on DTensor parameters, each rank's block of
  rows of every tensor, after FSDP reduce-scattered the gradients and we clipped them.

CPU-only machines (tests, laptops) need a few workarounds; each sits behind :func:`cpu_only` so
GPU users never pay for them.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import fsdp2
from .dtypes import MIXED_PRECISIONS


def cpu_only() -> bool:
    """True where no CUDA GPU exists: the CPU workarounds below apply only then."""
    return not torch.cuda.is_available()


def skip_deepspeed_shm_op() -> None:
    """Stop DeepSpeed from compiling its shared-memory op when it starts (CPU only).

    ``deepspeed.init_distributed`` builds a shared-memory all-reduce kernel for CPU inference
    (~20 s of g++ on first use). Training goes through gloo and never calls it, so mark the op as
    unavailable; DeepSpeed then falls back to torch.distributed as it does on non-Linux systems.
    """
    if not cpu_only():
        return
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def deepspeed_requested(ds_config: str | os.PathLike | dict | None) -> bool:
    """A DeepSpeed config was given in code or by ``accelerate launch`` (which sets the env var)."""
    return ds_config is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_accelerator(
    ds_config: str | os.PathLike | dict | None = None,
    mixed_precision: str | None = None,
    grad_accum: int = 1,
    log_with: list[str] | None = None,
    project_dir: str | os.PathLike | None = None,
):
    """The Accelerator for this launch; call it before loading the model.

    ``ds_config`` (a DeepSpeed JSON file or dict) selects DeepSpeed when the script was started
    with ``torchrun`` or ``deepspeed``; under ``accelerate launch`` the config file of the
    Accelerate YAML is used and ``ds_config`` may stay None. Creating the Accelerator first matters
    for ZeRO-3: it arms ``from_pretrained`` to load the model already partitioned.
    ``mixed_precision`` None takes the launcher's setting ("no" without one).
    ``log_with`` names Accelerate's experiment trackers (tensorboard, wandb, mlflow, trackio); they
    keep their local files under ``project_dir`` (TensorBoard: ``project_dir/tensorboard``).
    """
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    if mixed_precision is not None and mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS}, got {mixed_precision!r}")
    if cpu_only() and (mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")) == "fp16":
        raise ValueError("fp16 with loss scaling needs a CUDA GPU; on CPU use mixed_precision='bf16' or 'no'")
    kwargs: dict = {"gradient_accumulation_steps": grad_accum, "mixed_precision": mixed_precision}
    if log_with:
        if project_dir is None and "tensorboard" in log_with:
            raise ValueError("log_with tensorboard needs a project_dir for its event files")
        kwargs["log_with"] = list(log_with)
        if project_dir is not None:
            kwargs["project_config"] = ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(Path(project_dir) / "tensorboard"))
    use_deepspeed = deepspeed_requested(ds_config)
    use_fsdp = fsdp2.requested()
    if use_fsdp:
        fsdp2.check_request(use_deepspeed)
        single_process_rendezvous()
    if use_deepspeed and os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("true", "1", "yes"):
        # Accelerate would quietly run plain multi-CPU DDP instead of the ZeRO run that was asked for.
        raise ValueError(
            "ACCELERATE_USE_CPU=true (accelerate launch --cpu, or use_cpu: true in its config) turns DeepSpeed off, but a "
            "DeepSpeed config was given: drop --cpu / use_cpu (DeepSpeed runs on the CPU over gloo where there is no GPU), "
            "or drop the DeepSpeed config to train with DDP"
        )
    if use_deepspeed:
        skip_deepspeed_shm_op()
        single_process_rendezvous()
        if ds_config is not None:
            config = load_ds_config(ds_config)
            stage = config.get("zero_optimization", {}).get("stage", 0)
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=stage == 3)
    if cpu_only():
        if use_deepspeed:
            # Accelerate picks no backend on a GPU-less machine and the DeepSpeed batch-size check fails.
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:
            # Without cpu=True, a torchrun/accelerate-launched CPU job runs as N unrelated processes.
            kwargs["cpu"] = True
    accelerator = Accelerator(**kwargs)
    if use_fsdp:
        if cpu_only():
            fsdp2.use_on_cpu(accelerator)
        fsdp2.set_mixed_precision(accelerator, mixed_precision)
    missing = [name for name in log_with or [] if name not in {str(tracker) for tracker in accelerator.log_with}]
    if missing:
        raise ValueError(f"Accelerate {accelerate_version()} cannot log to {', '.join(missing)} here (its package is missing or unsupported)")
    return accelerator


def accelerate_version() -> str:
    import accelerate

    return accelerate.__version__


def single_process_rendezvous() -> None:
    """``sora-train`` with a DeepSpeed config but no launcher: DeepSpeed needs a process group even
    for one process, so describe a world of one (a free local port) the way torchrun would."""
    if any(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def load_ds_config(ds_config: str | os.PathLike | dict) -> dict:
    """A DeepSpeed config as a fresh dict, with a readable error for a bad file."""
    if isinstance(ds_config, dict):
        return json.loads(json.dumps(ds_config))
    path = Path(ds_config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} not found (the ds_configs/ folder has starting points)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON in the DeepSpeed config: {err.msg}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a DeepSpeed config is a JSON object (keys such as zero_optimization), got a {type(config).__name__}")
    return config


def offloads_optimizer(ds_config: dict | None) -> bool:
    """The DeepSpeed config moves the optimizer state to CPU memory or NVMe (ZeRO-Offload)."""
    device = ((ds_config or {}).get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    return str(device).lower() in ("cpu", "nvme")


def launch_ds_config(ds_config: str | os.PathLike | None) -> dict | None:
    """The DeepSpeed config a run will use: the given file, else the one ``accelerate launch`` names."""
    path = ds_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or str(path).lower() == "none":
        return None
    return load_ds_config(path)


def engine_ds_config(accelerator) -> dict | None:
    """The DeepSpeed config of a prepared-to-be DeepSpeed run; None elsewhere."""
    return accelerator.state.deepspeed_plugin.deepspeed_config if uses_deepspeed(accelerator) else None


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage of a DeepSpeed run; None for plain PyTorch and DDP."""
    if not uses_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def uses_fsdp2(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


def backend_name(accelerator) -> str:
    stage = zero_stage(accelerator)
    if stage is not None:
        return f"deepspeed-zero{stage}"
    if uses_fsdp2(accelerator):
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "single"


def fill_deepspeed_config(accelerator, micro_batch_size: int, max_grad_norm: float) -> None:
    """Resolve the "auto" fields Accelerate cannot fill without a DataLoader, and check the rest.

    The training loop owns batch size, accumulation and clipping; a DeepSpeed config that says
    something else would silently train a different recipe, so a fixed value must agree.
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "gradient_clipping": float(max_grad_norm),
        "train_batch_size": micro_batch_size * accelerator.gradient_accumulation_steps * accelerator.num_processes,
    }
    for key, value in wanted.items():
        current = config.get(key, "auto")
        if current == "auto":
            config[key] = value
        elif float(current) != float(value):
            raise ValueError(
                f"DeepSpeed config: {key} is {current} but the training settings give {value}; "
                f'set "{key}": "auto" in the DeepSpeed JSON (or make the two agree)'
            )


def prepare(accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch_size: int, max_grad_norm: float):
    """``accelerator.prepare`` with the DeepSpeed config filled from the training settings.

    Returns (model, optimizer) as the backend wraps them; the optimizer the backend will step is
    :func:`client_optimizer` of the wrapped one.
    """
    if uses_deepspeed(accelerator):
        fill_deepspeed_config(accelerator, micro_batch_size, max_grad_norm)
        if zero_stage(accelerator) == 0 and engine_dtype(accelerator) == torch.bfloat16 and accelerator.is_main_process:
            warnings.warn(
                "DeepSpeed ZeRO-0 with bf16 keeps no fp32 master weights: the adapter and the gates are updated "
                "in bf16, where small steps round away. Use ZeRO-1 (ds_configs/zero1.json) or DDP with bf16 autocast.",
                stacklevel=2,
            )
    return accelerator.prepare(model, optimizer)


def shard_numel(wrapped, optimizer: torch.optim.Optimizer, group_indices: set[int]) -> int:
    """How many elements of the param groups ``group_indices`` this rank's optimizer steps (its
    shard under ZeRO-1/2/3).

    ZeRO-3 puts a group's flat fp32 shard into ``params`` only while it steps, so there the shard
    is found through DeepSpeed's sub-group table instead.
    """
    zero3 = getattr(wrapped, "optimizer", None)
    table = getattr(zero3, "sub_group_to_group_id", None)
    if table is not None:
        shards = zero3.fp32_partitioned_groups_flat
        return sum(shards[sub].numel() for sub, group in table.items() if group in group_indices)
    return sum(fsdp2.local_numel(p) for i in group_indices for p in optimizer.param_groups[i]["params"])


def client_optimizer(optimizer) -> torch.optim.Optimizer:
    """The innermost optimizer under Accelerate's and DeepSpeed's wrappers (each holds the next one
    as ``.optimizer``): the one whose ``step()`` really runs."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def zero12_optimizer(optimizer):
    """DeepSpeed's ZeRO-1/2 optimizer under Accelerate's wrapper, or None for any other optimizer."""
    while optimizer is not None and not hasattr(optimizer, "bit16_groups"):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def zero12_flat_layouts(optimizer) -> list[tuple[list, list[int] | None, int]] | None:
    """Per param group of a DeepSpeed ZeRO-1/2 optimizer: (its parameters in flat order, their
    offsets in the flat buffer (None: one after the other), where this rank's piece starts); None
    for any other optimizer."""
    zero = zero12_optimizer(optimizer)
    if zero is None:
        return None
    offsets = getattr(zero, "round_robin_bit16_offsets", None)
    layouts = []
    for i, params in enumerate(getattr(zero, "round_robin_bit16_groups", zero.bit16_groups)):
        pieces = zero.parallel_partitioned_bit16_groups[i]
        rank = torch.distributed.get_rank(group=zero.real_dp_process_group[i])
        layouts.append((list(params), list(offsets[i]) if offsets else None, sum(t.numel() for t in pieces[:rank])))
    return layouts


def zero12_copy_to_model(optimizer):
    """A function copying every fp32 partition of a ZeRO-1/2 optimizer into the model's bit16
    partition (what DeepSpeed does right after each group's step; its all-gather follows the last
    group), or None for any other optimizer."""
    zero = zero12_optimizer(optimizer)
    if zero is None:
        return None

    @torch.no_grad()
    def copy() -> None:
        for i, (bit16, fp32) in enumerate(zip(zero.parallel_partitioned_bit16_groups, zero.single_partition_of_fp32_groups)):
            bit16[torch.distributed.get_rank(group=zero.real_dp_process_group[i])].copy_(fp32)

    return copy


def clip_gradients(accelerator, model: nn.Module, max_norm: float) -> None:
    """Clip the global gradient norm. DeepSpeed clips inside its step, from ``gradient_clipping``."""
    if max_norm > 0 and not uses_deepspeed(accelerator):
        accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)


def engine_dtype(accelerator) -> torch.dtype | None:
    """The dtype DeepSpeed keeps the model in (bf16/fp16 runs); None where autocast handles inputs."""
    if not uses_deepspeed(accelerator):
        return None
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if config.get(key, {}).get("enabled") is True:
            return dtype
    return None


def to_device(batch: dict, accelerator) -> dict:
    """Move a batch to this rank's device; float inputs take the engine's dtype under DeepSpeed.

    DeepSpeed keeps a bf16/fp16 model but, unlike autocast, does not cast the inputs.
    """
    dtype = engine_dtype(accelerator)
    moved = {}
    for key, value in batch.items():
        value = value.to(accelerator.device)
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        moved[key] = value
    return moved


def save_state(accelerator, model: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Backend checkpoint of the trainable state (every rank calls it): weights, optimizer, RNG.

    DeepSpeed writes its own sharded files; frozen base weights are left out everywhere (they come
    back from the base model) so a checkpoint holds the adapter, not another copy of the model.
    """
    if uses_deepspeed(accelerator):
        accelerator.save_state(str(path), exclude_frozen_parameters=True)
        return
    if uses_fsdp2(accelerator):
        fsdp2.save_state(model, client_optimizer(optimizer), path, accelerator.process_index)
        return
    trainable = trainable_names(accelerator, model)

    def drop_frozen(models, weights, output_dir):
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if k.removeprefix("module.") in trainable}

    handle = accelerator.register_save_state_pre_hook(drop_frozen)
    try:
        accelerator.save_state(str(path))
    finally:
        handle.remove()


def load_state(accelerator, model: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a checkpoint written by :func:`save_state`.

    Frozen weights are absent, so loading is non-strict; the saved names are checked first, so a
    checkpoint of another model fails instead of silently loading nothing.
    """
    if uses_deepspeed(accelerator):
        accelerator.load_state(str(path), load_module_strict=False)
        return
    if uses_fsdp2(accelerator):
        fsdp2.load_state(model, client_optimizer(optimizer), path, accelerator.process_index)
        return
    from safetensors import safe_open

    weights = Path(path) / "model.safetensors"
    with safe_open(str(weights), framework="pt") as saved:
        stray = sorted(k for k in saved.keys() if k.removeprefix("module.") not in trainable_names(accelerator, model))
    if stray:
        raise ValueError(f"{weights}: {len(stray)} saved tensors are not trainable parameters of this model (first: {stray[0]!r})")
    accelerator.load_state(str(path), strict=False)


def trainable_names(accelerator, model: nn.Module) -> set[str]:
    return {name for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}


def end_of_run(finished: bool = True, accelerator=None) -> None:
    """Barrier, close the experiment trackers (``accelerator.end_training``), then tear down the
    process group; skipping the barrier aborts ~1 run in 9 at exit.

    After an exception (``finished`` False) there is no barrier: the other ranks may be waiting
    in a collective this rank never reaches, so a barrier would wait forever. The trackers are
    still closed (what they logged is kept); the process exits and the launcher stops the other ranks.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and finished:
        torch.distributed.barrier()
    if accelerator is not None and finished:
        accelerator.end_training()
    elif accelerator is not None:
        for tracker in accelerator.trackers:
            try:
                tracker.finish()
            except Exception as err:  # the run's own error is the one to report
                print(f"could not close the {tracker.name} tracker: {err}", flush=True)
    if distributed and finished and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
