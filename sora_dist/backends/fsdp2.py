"""PyTorch FSDP2 (``fully_shard``, DTensor parameters) through Accelerate: what SoRA needs of it.

Accelerate prepares the model (one FSDP unit per decoder layer, from ``_no_split_modules``, plus
the root) and swaps the optimizer's parameters for the sharded DTensors. Every parameter is
sharded along dim 0 (torch.chunk over the processes), so a rank holds a block of rows of each
tensor: of A (r x d_in) whole rows, of B (d_out x r) a block of output rows with all r columns, of
the gate (r) a block of entries, aligned with A's rows. The gate step is elementwise and runs on
each rank's block (core/optim.py ``local_tensor``); budget mode gathers only the |z| of the gates,
and the scale-moving step sums the squares of B's columns over the ranks (core/balance.py).

Checkpoints are written with torch.distributed.checkpoint (DCP): the trainable parameters and
their optimizer state, each rank writing its own rows, readable onto another number of processes;
the frozen base is never written. Our own code because Accelerate's FSDP checkpoint writes the
whole model, frozen base included, and its optimizer path initialises empty optimizer state by
stepping the optimizer once, which for SoRA would threshold the gates.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

CHECKPOINT_SUBDIR = "fsdp2"  # DCP files of a checkpoint written under FSDP2
SCALARS_NAME = "optimizer_scalars.json"  # optimizer state that is not a tensor (e.g. an int step count)
RNG_NAME = "rng_state_{rank}.pkl"
MODEL_KEY, OPTIM_KEY = "model/", "optim/"
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")  # activation checkpointing and torch.compile wrappers


def requested() -> bool:
    """``accelerate launch`` with ``distributed_type: FSDP`` (it sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_request(use_deepspeed: bool) -> None:
    """Refuse what SoRA does not run under FSDP, in one line, before anything loads."""
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(
            f"FSDP version {version} (fsdp_version: {version} in the Accelerate config) is not supported: SoRA trains under "
            "FSDP2; set fsdp_version: 2 (launch/fsdp2.yaml), or use DeepSpeed (launch/zero2.yaml)"
        )
    if use_deepspeed:
        raise ValueError("both FSDP (ACCELERATE_USE_FSDP) and a DeepSpeed config were given: choose one engine")


def recomputes_without_rng() -> bool:
    """Accelerate's FSDP2 activation checkpointing wraps each layer with ``preserve_rng_state=False``:
    the backward recomputation draws new dropout masks, unlike the forward's."""
    return os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true"


def use_on_cpu(accelerator) -> None:
    """Turn the CPU (gloo) Accelerator into an FSDP2 one (CPU only).

    Accelerate uses FSDP only with an accelerator device; without a GPU it runs multi-CPU DDP
    and ignores the FSDP settings. ``fully_shard`` itself runs on the CPU over gloo, so keep the
    process group Accelerate made and switch its state to FSDP with the launcher's plugin.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise ValueError("fsdp_offload_params: true moves sharded state from the GPU to CPU memory; without a GPU it already is "
                         "there and FSDP2's offload cannot run: set fsdp_offload_params: false")  # fmt: skip
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* settings accelerate launch exported
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def set_mixed_precision(accelerator, mixed_precision: str | None) -> None:
    """bf16/fp16 parameters in forward and backward, gradients reduced in fp32 (Accelerate's default
    reduces in the low precision), the sharded parameters and optimizer state kept in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision or accelerator.mixed_precision)
    if dtype is not None:
        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def local_numel(tensor: torch.Tensor) -> int:
    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (an all-gather: every rank must call it), else the tensor."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def row_offset(tensor: torch.Tensor) -> int:
    """First row (dim 0) of the full tensor that this rank's block of a DTensor holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return int(offset[0]) if len(offset) else 0


def canonical_name(name: str) -> str:
    """A parameter's name in the unwrapped model (without activation-checkpointing, compile or DDP wrappers)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name.removeprefix("module.")


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {canonical_name(name): p for name, p in model.named_parameters() if p.requires_grad}


# --- Checkpoints -------------------------------------------------------------------------------


def save_state(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike, rank: int) -> None:
    """Trainable parameters, optimizer state and this rank's RNG into ``path`` (every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    params = trainable(model)
    names = {id(p): name for name, p in params.items()}
    state: dict[str, torch.Tensor] = {MODEL_KEY + name: p.detach() for name, p in params.items()}
    scalars: dict[str, dict] = {}
    for param, values in optimizer.state.items():
        name = names.get(id(param))
        if name is None:
            raise RuntimeError("the optimizer holds state for a tensor that is not a trainable parameter of the model")
        for key, value in values.items():
            if torch.is_tensor(value):
                state[f"{OPTIM_KEY}{name}/{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    path = Path(path)
    dcp.save(state, checkpoint_id=str(path / CHECKPOINT_SUBDIR))
    if rank == 0:
        (path / SCALARS_NAME).write_text(json.dumps(scalars, sort_keys=True) + "\n")
    with open(path / RNG_NAME.format(rank=rank), "wb") as out:
        pickle.dump(rng_state(), out)


def load_state(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike, rank: int) -> None:
    """Load :func:`save_state`'s files, resharded to this run's processes by DCP."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    reader = dcp.FileSystemReader(str(path / CHECKPOINT_SUBDIR))
    saved = reader.read_metadata().state_dict_metadata
    params = trainable(model)
    names = sorted(key[len(MODEL_KEY) :] for key in saved if key.startswith(MODEL_KEY))
    if sorted(params) != names:
        extra, missing = sorted(set(names) - set(params)), sorted(set(params) - set(names))
        first = (f"saved tensor {extra[0]!r} is not a trainable parameter" if extra else f"trainable parameter {missing[0]!r} is not saved")
        raise ValueError(f"{path}: this checkpoint is of another model: {first}")
    state: dict[str, torch.Tensor] = {MODEL_KEY + name: p.detach() for name, p in params.items()}
    targets: dict[str, tuple[nn.Parameter, str]] = {}
    for key, meta in saved.items():
        if not key.startswith(OPTIM_KEY):
            continue
        name, _, slot = key[len(OPTIM_KEY) :].rpartition("/")
        param = params[name]
        if tuple(meta.size) == tuple(param.shape):
            state[key] = torch.zeros_like(param.detach(), dtype=meta.properties.dtype)  # sharded like the parameter
        else:
            state[key] = torch.zeros(tuple(meta.size), dtype=meta.properties.dtype, device=param.device)
        targets[key] = (param, slot)
    dcp.load(state, checkpoint_id=str(path / CHECKPOINT_SUBDIR))
    scalars = json.loads((path / SCALARS_NAME).read_text()) if (path / SCALARS_NAME).is_file() else {}
    optimizer.state.clear()
    for key, (param, slot) in targets.items():
        optimizer.state[param][slot] = state[key]
    for name, values in scalars.items():
        optimizer.state[params[name]].update(values)
    rng = path / RNG_NAME.format(rank=rank)
    if rng.is_file():
        with open(rng, "rb") as src:
            set_rng_state(pickle.load(src))


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CHECKPOINT_SUBDIR / ".metadata").is_file()


def read_trainable(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full trainable tensors of an FSDP2 checkpoint, read in one process (no process group)."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(Path(path) / CHECKPOINT_SUBDIR))
    saved = reader.read_metadata().state_dict_metadata
    state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in saved.items() if key.startswith(MODEL_KEY)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return {key[len(MODEL_KEY) :]: value for key, value in state.items()}
