"""Move each rank's scale into its gate after every step, so that |g_i| is the rank's contribution.

ΔW = s · Σ_i g_i · B[:, i] · A[i, :] does not change when g_i → c·g_i and A[i, :] → A[i, :]/c
(docs/method.md §7): |g| alone ranks by an arbitrary scale. With ``normalize_factors`` the
optimizer ends every step by scaling each row of A and each column of B to norm 1 and multiplying
the gate by the two norms it took out:

    a_i = ‖A[i, :]‖,  b_i = ‖B[:, i]‖;   g_i ← g_i·a_i·b_i,  A[i, :] ← A[i, :]/a_i,  B[:, i] ← B[:, i]/b_i

so |g_i| = ‖B[:, i]‖·‖A[i, :]‖·|g_i| of before: the Frobenius norm of the rank's term over s, which
the threshold and budget mode then rank by. A rank whose A row or B column is all zero (B starts at
0) is left as it is until it has both.

On ZeRO-1/2 each rank holds a contiguous piece of each param group's flat fp32 buffer (the
group's parameters flattened in order, padded at the end, cut into equal pieces). A row of A or a
column of B can straddle two pieces, so each rank sums the squares of the elements it holds per
(module, rank) and one all-reduce of that vector (2 numbers per SoRA rank of the model) gives
every rank the whole norms; the rescaling is then elementwise on what each rank holds. The layout
is recorded per group when the groups are built (:func:`factor_layout`) and replaced by the
engine's own offsets (DeepSpeed pads each parameter to an alignment) once it has flattened them
(:func:`use_zero_layout`). Under FSDP2 each rank holds a block of rows of every tensor: whole
rows of A, a block of B's output rows with all r columns, the gate entries aligned with A's rows.
So A's norms are complete on the rank that holds the row, B's are split across every rank, and the
same one all-reduce of the per-rank sums of squares makes both whole. Our own code because no library rescales factor pairs across
parameters on ZeRO's flat shards.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from ..backends.fsdp2 import row_offset

LAYOUT = "factor_layout"  # per group: [(role, module index, shape, flat offset)] in the group's parameter order
BALANCE = "normalize_factors"  # per group: True when the scale-moving step runs on it
SHARD_START = "shard_start"  # per group, ZeRO-1/2: where this rank's piece starts in the group's flat order


def factor_roles(model) -> dict[int, tuple[str, int]]:
    """id(parameter) -> (role, module index) for every SoRA module's A, B and gate."""
    from .inject import sora_modules

    return {id(getattr(m, name)): (role, k) for k, (_, m) in enumerate(sora_modules(model))
            for name, role in (("lora_A", "A"), ("lora_B", "B"), ("gate", "gate"))}  # fmt: skip


def factor_layout(params: list[torch.Tensor], roles: dict[int, tuple[str, int]], offsets: list[int] | None = None) -> list[tuple]:
    """The group's entries in order: (role, module index, full shape, offset in the flat order);
    role None for anything else. ``offsets`` default: one after the other, no padding."""
    shapes = [tuple(getattr(p, "ds_shape", p.shape)) for p in params]
    if offsets is None:
        offsets = torch.tensor([0] + [_numel(s) for s in shapes[:-1]]).cumsum(0).tolist()
    return [(*roles.get(id(p), (None, -1)), shape, offset) for p, shape, offset in zip(params, shapes, offsets)]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def pieces(group: dict, rank: int, sharded: bool) -> list[tuple[torch.Tensor, int]]:
    """(1-d tensor, its first position in the group's flat order) for what this process holds.
    FSDP2 (DTensor parameters): each rank holds a block of rows of each tensor, contiguous in its
    flat order, from the row :func:`row_offset` gives."""
    if any(isinstance(p, DTensor) for p in group["params"]):
        out = []
        for param, entry in zip(group["params"], group[LAYOUT]):
            row = _numel(entry[2][1:])
            out.append((param.to_local().data.view(-1), entry[3] + row_offset(param) * row))
        return out
    if not sharded:
        return [(param.data.view(-1), entry[3]) for param, entry in zip(group["params"], group[LAYOUT])]
    (flat,) = group["params"]
    return [(flat.data.view(-1), group.get(SHARD_START, rank * flat.numel()))]


def held(groups: list[dict], rank: int = 0, sharded: bool = False) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor]], int]:
    """(role, SoRA rank of each element, this process's view of the elements) for every part of an
    A, B or gate this process holds, and the number of SoRA ranks in the model. SoRA rank i of
    module k is ``starts[k] + i``: A (r x d_in) by row, B (d_out x r) by column, g by index."""
    starts = torch.tensor([0] + module_ranks(groups)).cumsum(0).tolist()
    out = []
    for group in groups:
        for piece, start in pieces(group, rank, sharded):
            end = start + piece.numel()
            for role, module, shape, offset in group[LAYOUT]:
                lo, hi = max(offset, start), min(offset + _numel(shape), end)
                if role is None or lo >= hi:
                    continue
                positions = torch.arange(lo - offset, hi - offset, device=piece.device)
                within = positions // shape[1] if role == "A" else positions % shape[1] if role == "B" else positions
                out.append((role, starts[module] + within, piece[lo - start : hi - start]))
    return out, starts[-1]


def module_ranks(groups: list[dict]) -> list[int]:
    """r of every SoRA module, by module index, from the gate entries of the layouts."""
    ranks = {module: shape[0] for g in groups for role, module, shape, _ in g.get(LAYOUT, ()) if role == "gate"}
    return [ranks[k] for k in range(len(ranks))]


def factor_squares(groups: list[dict], rank: int = 0, sharded: bool = False, parts=None) -> torch.Tensor:
    """[‖A_i‖² | ‖B_i‖²] over the SoRA ranks of the model, from what this process holds (partial sums
    when ``sharded``); ``parts``: :func:`held` of the same arguments, if already made."""
    parts, total = parts or held(groups, rank, sharded)
    squares = torch.zeros(2 * total, dtype=torch.float64, device=groups[0]["params"][0].device)
    for role, index, values in parts:
        if role != "gate":
            squares.index_add_(0, index + (total if role == "B" else 0), values.double() ** 2)
    return squares


def apply_factors_(groups: list[dict], squares: torch.Tensor, rank: int = 0, sharded: bool = False, parts=None) -> None:
    """Rescale what this process holds, given the whole norms (``squares`` summed over processes)."""
    parts, total = parts or held(groups, rank, sharded)
    norm_a, norm_b = squares[:total].sqrt(), squares[total:].sqrt()
    alive = (norm_a > 0) & (norm_b > 0)
    one = torch.ones_like(norm_a)
    factor = {"A": torch.where(alive, 1 / norm_a, one), "B": torch.where(alive, 1 / norm_b, one), "gate": torch.where(alive, norm_a * norm_b, one)}
    for role, index, values in parts:
        values.mul_(factor[role][index].to(values.dtype))


def normalize_factors_(groups: list[dict], rank: int = 0, sharded: bool = False, all_reduce=None) -> None:
    """The scale-moving step on every group flagged with BALANCE (whole tensors, or this process's
    ZeRO pieces with ``sharded``; ``all_reduce`` sums a tensor over the processes in place: the one
    collective of the step)."""
    groups = [g for g in groups if g.get(BALANCE)]
    if not groups:
        return
    parts = held(groups, rank, sharded)
    squares = factor_squares(groups, rank, sharded, parts)
    if sharded and all_reduce is not None:
        all_reduce(squares)
    apply_factors_(groups, squares, rank, sharded, parts)


def use_zero_layout(groups: list[dict], flat_layouts: list[tuple[list, list[int] | None, int]], roles: dict[int, tuple[str, int]]) -> None:
    """Adopt the engine's flat layout: per group, (its parameters in flat order, their offsets, where
    this rank's piece starts). Checks it: the piece must hold the parameters' values at those places."""
    for group, (params, offsets, start) in zip(groups, flat_layouts):
        if not group.get(BALANCE):
            continue
        group[LAYOUT], group[SHARD_START] = factor_layout(params, roles, offsets), start
        (flat,) = group["params"]
        for (role, _, shape, offset), param in zip(group[LAYOUT], params):
            lo, hi = max(offset, start), min(offset + _numel(shape), start + flat.numel())
            if role is not None and lo < hi:
                mine = flat.data.view(-1)[lo - start : hi - start]
                if not torch.equal(mine, param.data.view(-1)[lo - offset : hi - offset].to(mine.dtype)):
                    raise RuntimeError("normalize_factors: the ZeRO flat buffer is not laid out as expected; use it without ZeRO-1/2")
