"""SoRAOptimizer: any inner optimizer for the adapter weights, a proximal step for the gates (docs/method.md).

Every operation on a gate is elementwise, so ``step()`` is equally correct on whole tensors (single
process, DDP, ZeRO-0) and on the flat fp32 shards that DeepSpeed ZeRO-1/2/3 puts in a group's
``params`` (it keeps the group's other keys). The gradient it reads is whatever the backend left in
``.grad`` after averaging and clipping, so every replica takes the same step with no extra
communication.

The gate-group contract. The gates live in their own param group, marked by ``GATE_FLAG``; what
the gate step reads from that group is named by the constants below, and only the functions of
this module write them: :func:`sora_param_groups` builds the groups, :func:`set_lambda` sets λ
(and budget mode's keep count) before a step, :func:`scale_learning_rates` applies the lr
schedule, :func:`mark_sharded` tells the step that it sees ZeRO shards, and :func:`last_lambda`
reads back the λ the last step used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from .balance import BALANCE, LAYOUT, factor_layout, factor_roles, normalize_factors_
from .config import GATE_UPDATES, THRESHOLDS
from .inject import sora_modules

GATE_FLAG = "sora_gate"  # marks the gate group; survives DeepSpeed's regrouping into flat shards
GATE_UPDATE = "gate_update"  # prox_adam | prox_sgd
THRESHOLD = "threshold"  # lr_scaled (τ = η·λ) | fixed (τ = λ)
LAMBDA = "prox_lambda"  # λ of the next step (the cap λ_max in budget mode)
KEEP = "prox_keep"  # budget mode: gates left non-zero after the next step; absent or None otherwise
TAU = "prox_tau"  # budget mode: the τ the last step used (a 0-d tensor: no host sync), written by step()
SHARDED = "gate_sharded"  # each rank steps a shard of the gates (ZeRO-1/2/3): budget mode gathers |z|
PEAK_LR = "peak_lr"  # the group's learning rate before the schedule's factor
GATE_L1 = "gate_l1"  # the released code's sparse_lambda: gate_l1 · Σ|g| / GATE_COUNT is part of the loss
GATE_COUNT = "gate_count"  # gates of the whole model (not of this rank's shard): the L1 term's n

def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (FSDP2 shards each parameter along dim 0), sharing its
    storage, so in-place updates of the piece update the parameter; any other tensor as it is.
    The gate step is elementwise, so it runs on the pieces and never gathers a parameter."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def add_l1_gradient_(group: dict) -> None:
    """The gradient of gate_l1 · Σ|g| / n_gates (the released code's second L1 term, which it adds
    to the loss) added to the gate gradients before the gradient step, so Adam sees it as part of
    the loss gradient. Elementwise, so a ZeRO shard of the gates needs nothing from other ranks;
    n_gates is the whole model's count. It comes after gradient clipping (the released code clips
    it with the rest), which keeps it independent of the clipping of the other gradients."""
    gates = [local_tensor(g) for g in group["params"] if g.grad is not None]
    grads = [local_tensor(g.grad) for g in group["params"] if g.grad is not None]
    if gates:
        torch._foreach_add_(grads, torch._foreach_sign(gates), alpha=group[GATE_L1] / group[GATE_COUNT])


def prox_threshold(lr: float, prox_lambda: float, threshold: str) -> float:
    """τ of the soft-threshold: η·λ for ``lr_scaled`` (the paper), ξ = λ for ``fixed``."""
    return lr * prox_lambda if threshold == "lr_scaled" else prox_lambda


def soft_threshold_(gate: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """In place S_τ(z) = sign(z) · max(|z| − τ, 0)."""
    return gate.copy_(_shrink(gate, tau)) if torch.is_tensor(tau) or tau > 0 else gate


def _shrink(z: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(tau):  # softshrink takes only a Python float
        return z.sign() * (z.abs() - tau.to(z.dtype)).clamp_min(0)
    return F.softshrink(z, tau)


class SoRAOptimizer(torch.optim.Optimizer):
    """One optimizer for a SoRA model around an inner optimizer; build its groups with
    :func:`sora_param_groups`.

    Every non-gate group is stepped by the inner optimizer (``inner``: a ``torch.optim.Optimizer``
    class or a callable taking the groups; default ``torch.optim.AdamW``; ``inner_kwargs`` go to
    it) exactly as that optimizer would step it alone. Gate groups (``sora_gate=True``) take
    ``prox_adam`` (the inner's own Adam step when it is an Adam, with no weight decay; else the
    bias-corrected Adam below) or ``prox_sgd`` (g − η∇g), then S_τ.

    The inner optimizer holds the very group dicts of this one and shares its ``state``: when
    DeepSpeed ZeRO-1/2/3 swaps a group's ``params`` for this rank's flat fp32 shard, the inner one
    steps that shard, and ``state_dict``/``load_state_dict`` cover both.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 inner=None, **inner_kwargs):  # fmt: skip
        if lr < 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            **{GATE_FLAG: False, GATE_UPDATE: "prox_adam", THRESHOLD: "lr_scaled", LAMBDA: 0.0},
        )
        self.inner_factory, self.inner_kwargs, self.inner = inner or torch.optim.AdamW, dict(inner_kwargs), None
        super().__init__(params, defaults)
        self._build_inner()
        self._find_factor_groups()
        # Set by the backend when it keeps low-precision copies of what this optimizer steps and
        # refreshes them group by group (ZeRO-1/2): the scale-moving step rescaled groups already copied.
        self.after_factor_step = None

    def _find_factor_groups(self) -> None:
        """The groups the scale-moving step spans (kept: DeepSpeed narrows param_groups per step)."""
        self._factor_groups = [g for g in self.param_groups if g.get(BALANCE)]
        self._factor_stepped: set[int] = set()

    def _build_inner(self) -> None:
        adapters = [g for g in self.param_groups if not g[GATE_FLAG]]
        self.inner = self.inner_factory(adapters, **self.inner_kwargs) if adapters else None
        if self.inner is None:
            return
        self.inner.state = self.state  # one state for both: DeepSpeed and checkpoints see it whole
        for group in self.param_groups:
            if self._inner_steps(group) and group[GATE_FLAG]:
                self.inner.add_param_group(group)

    def inner_is_adam(self) -> bool:
        return self.inner is not None and "adam" in type(self.inner).__name__.lower()

    def _inner_steps(self, group: dict) -> bool:
        """Adapter groups always; a prox_adam gate group when the inner optimizer is an Adam."""
        return not group[GATE_FLAG] or (group[GATE_UPDATE] == "prox_adam" and self.inner_is_adam())

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (``__init__`` adds each of its groups here too) and validate its settings."""
        super().add_param_group(param_group)
        group, index = self.param_groups[-1], len(self.param_groups) - 1
        try:
            _check_group(group, index)
        except ValueError:
            self.param_groups.pop()
            raise
        if self.inner is not None and self._inner_steps(group):
            self.inner.add_param_group(group)

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles and deep-copies only defaults, state and groups; the inner one too
        return {**super().__getstate__(), "inner": self.inner, "inner_factory": self.inner_factory, "inner_kwargs": self.inner_kwargs,
                "_factor_groups": self._factor_groups, "_factor_stepped": set(), "after_factor_step": None}  # fmt: skip

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.inner is not None:  # torch rebuilt the groups and the state: hand them to the inner optimizer again
            self.inner.param_groups = [g for g in self.param_groups if self._inner_steps(g)]
            self.inner.state = self.state
        self._find_factor_groups()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group[GATE_FLAG] and group.get(GATE_L1):
                add_l1_gradient_(group)
        if self.inner is not None:
            self.inner.step()
        for group in self.param_groups:
            if group[GATE_FLAG]:
                self._gate_step(group)
        if self._factor_groups:
            # DeepSpeed ZeRO-1/2 steps one group per call (param_groups narrowed to it): the
            # scale-moving step runs once every group it spans has taken this step.
            self._factor_stepped.update(id(g) for g in self.param_groups if g.get(BALANCE))
            if self._factor_stepped >= {id(g) for g in self._factor_groups}:
                self._factor_stepped = set()
                self._normalize_factors()
        return loss

    def _normalize_factors(self) -> None:
        groups = self._factor_groups
        sharded = any(group.get(SHARDED) for group in groups if group[GATE_FLAG])
        distributed = sharded and torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        normalize_factors_(groups, rank, sharded, torch.distributed.all_reduce if distributed else None)
        if self.after_factor_step is not None:
            self.after_factor_step()

    def _adam_state(self, param: torch.Tensor, group: dict) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """Advance ``param``'s step count; return (exp_avg, exp_avg_sq, -lr / bias1, sqrt(bias2)), the
        moments as this rank's pieces (they are kept like the parameter: DTensors under FSDP2)."""
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        bias1 = 1 - beta1 ** state["step"]
        bias2 = 1 - beta2 ** state["step"]
        return local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"]), -group["lr"] / bias1, math.sqrt(bias2)

    def _adam_update_(self, params: list[torch.Tensor], pieces: list[torch.Tensor], grads: list[torch.Tensor], group: dict) -> None:
        """The gates' Adam step when the inner optimizer is no Adam (e.g. SGD): bias-corrected, in
        torch AdamW's single-tensor formula, as ``torch._foreach_*`` ops (our own only because such
        an inner optimizer has no Adam to lend):

            m <- lerp(m, g, 1 - beta1);  v <- beta2 v + (1 - beta2) g^2
            p <- p - lr / bias1 * m / (sqrt(v) / sqrt(bias2) + eps)
        """
        exp_avgs, exp_avg_sqs, step_sizes, bias2_sqrts = zip(*(self._adam_state(p, group) for p in params))
        exp_avgs, exp_avg_sqs = list(exp_avgs), list(exp_avg_sqs)
        beta1, beta2 = group["betas"]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, list(bias2_sqrts))
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(pieces, exp_avgs, denom, list(step_sizes))

    def _gate_step(self, group: dict) -> None:
        tau = prox_threshold(group["lr"], group[LAMBDA], group[THRESHOLD])
        params = [g for g in group["params"] if g.grad is not None]
        if not params:
            return
        gates = [local_tensor(g) for g in params]
        grads = [local_tensor(g.grad) for g in params]
        if group[GATE_UPDATE] == "prox_sgd":
            torch._foreach_add_(gates, grads, alpha=-group["lr"])
        elif not self._inner_steps(group):
            self._adam_update_(params, gates, grads, group)
        # (else the inner Adam already took the gradient step: gates now hold z, before S_τ)
        if group.get(KEEP) is not None:
            # Budget mode: the smallest τ (at most the one above) that leaves KEEP gates alive.
            tau = torch.clamp(keep_threshold(gates, group[KEEP], group.get(SHARDED, False)), max=tau)
            group[TAU] = tau
        soft_threshold_all_(gates, tau)


def effective_lambda(group: dict) -> float:
    """The λ a gate group's last step used: in budget mode τ/η (τ for the fixed threshold), else its λ."""
    tau = group.get(TAU)
    if tau is None:
        return float(group[LAMBDA])
    if group[THRESHOLD] == "fixed":
        return float(tau)
    return float(tau) / group["lr"] if group["lr"] > 0 else 0.0


def keep_threshold(gates: list[torch.Tensor], keep: int, sharded: bool = False) -> torch.Tensor:
    """The smallest τ for which S_τ leaves at most ``keep`` of the ``gates`` non-zero (ties all die).

    That is the (keep+1)-th largest |z| over every gate element, 0 when at most ``keep`` are
    non-zero. With ``sharded`` (DeepSpeed ZeRO-1/2/3, where each rank steps a shard of the gate
    group) the |z| of every rank's shard are gathered first: two small collectives, the only ones
    the gate update ever issues, and only in budget mode. A 0-d tensor, so no host sync.
    """
    values = torch.cat([g.detach().reshape(-1).abs() for g in gates])
    if sharded and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        values = _gather_shards(values)
    if keep >= values.numel():
        return values.new_zeros(())
    return torch.kthvalue(values.float(), values.numel() - keep).values


def _gather_shards(values: torch.Tensor) -> torch.Tensor:
    """Every rank's ``values`` concatenated (shards may differ in length: padded with zeros, which
    count as dead gates)."""
    import torch.distributed as dist

    size = torch.tensor([values.numel()], device=values.device)
    dist.all_reduce(size, op=dist.ReduceOp.MAX)
    padded = torch.zeros(int(size), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    pieces = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, padded)
    return torch.cat(pieces)


def soft_threshold_all_(gates: list[torch.Tensor], tau: float | torch.Tensor) -> None:
    """:func:`soft_threshold_` on every tensor of ``gates``; one elementwise kernel when they share a
    device and dtype (the gates are concatenated, thresholded and copied back), not one per gate.
    ``tau`` may be a 0-d tensor (budget mode), so that no host sync is needed."""
    if not gates or (not torch.is_tensor(tau) and tau <= 0):
        return
    first = gates[0]
    if len(gates) == 1 or any(g.device != first.device or g.dtype != first.dtype for g in gates):
        for gate in gates:
            soft_threshold_(gate, tau)
        return
    shrunk = _shrink(torch.cat([g.reshape(-1) for g in gates]), tau)
    pieces = [piece.view_as(g) for piece, g in zip(shrunk.split([g.numel() for g in gates]), gates)]
    torch._foreach_copy_(gates, pieces)


def _check_group(group: dict, index: int) -> None:
    if group["lr"] < 0:
        raise ValueError(f"param group {index}: learning rate (lr) must be >= 0, got {group['lr']}")
    if group[GATE_FLAG]:
        _check_gate_group(group, index)


def _check_gate_group(group: dict, index: int) -> None:
    where = f"param group {index} ({GATE_FLAG})"
    if group[GATE_UPDATE] not in GATE_UPDATES:
        raise ValueError(f"{where}: gate_update must be one of {GATE_UPDATES}, got {group[GATE_UPDATE]!r}")
    if group[THRESHOLD] not in THRESHOLDS:
        raise ValueError(f"{where}: threshold must be one of {THRESHOLDS}, got {group[THRESHOLD]!r}")
    if not group[LAMBDA] >= 0:
        raise ValueError(f"{where}: {LAMBDA} (λ) must be >= 0, got {group[LAMBDA]}")
    if group["weight_decay"] != 0:
        raise ValueError(f"{where}: weight decay never applies to gates; got weight_decay={group['weight_decay']}")
    if not (math.isfinite(group.get(GATE_L1, 0.0)) and group.get(GATE_L1, 0.0) >= 0):
        raise ValueError(f"{where}: {GATE_L1} must be a finite number >= 0, got {group[GATE_L1]}")
    if group.get(GATE_L1) and not group.get(GATE_COUNT, 0) >= 1:
        raise ValueError(f"{where}: {GATE_L1} needs {GATE_COUNT}, the number of gates of the whole model")


def sora_param_groups(
    model: nn.Module,
    lr: float,
    gate_lr: float | None = None,
    weight_decay: float = 0.0,
    lambda_: float = 0.0,
    gate_update: str = "prox_adam",
    threshold: str = "lr_scaled",
    gate_l1: float = 0.0,
    normalize_factors: bool = False,
) -> list[dict]:
    """Param groups for :class:`SoRAOptimizer`: adapters (with decay), 1-d extras (no decay), gates.
    ``gate_l1`` > 0 adds gate_l1 · Σ|g| / n_gates to the loss (see :func:`add_l1_gradient_`);
    ``normalize_factors`` moves each rank's scale into its gate after every step (core/balance.py).

    "Extras" are the trainable parameters that are not SoRA weights (e.g. a classifier head kept
    by ``modules_to_save``); their biases and norms get no weight decay, as is customary.
    """
    gate_ids = {id(m.gate) for _, m in sora_modules(model)}
    if not gate_ids:
        raise ValueError("the model has no SoRA modules; call inject_sora(model, SoRAConfig(...)) first")
    gates, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in gate_ids:
            gates.append(param)
        elif param.ndim >= 2 or name.endswith(("lora_A", "lora_B")):
            decay.append(param)
        else:
            no_decay.append(param)
    gate_lr = lr if gate_lr is None else gate_lr
    groups = [
        {"params": decay, "lr": lr, PEAK_LR: lr, "weight_decay": weight_decay, "group_name": "adapter"},
        {"params": no_decay, "lr": lr, PEAK_LR: lr, "weight_decay": 0.0, "group_name": "adapter_no_decay"},
        {
            "params": gates,
            "lr": gate_lr,
            PEAK_LR: gate_lr,
            "weight_decay": 0.0,
            GATE_FLAG: True,
            GATE_UPDATE: gate_update,
            THRESHOLD: threshold,
            LAMBDA: lambda_,
            GATE_L1: gate_l1,
            GATE_COUNT: sum(m.rank for _, m in sora_modules(model)),
            "group_name": "gate",
        },
    ]
    groups = [g for g in groups if g["params"]]
    if normalize_factors:
        roles = factor_roles(model)
        for group in groups:
            if any(id(p) in roles for p in group["params"]):
                group[LAYOUT], group[BALANCE] = factor_layout(group["params"], roles), True
    return groups


def gate_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The gate groups of an optimizer (also through DeepSpeed or Accelerate wrappers)."""
    groups = [g for g in optimizer.param_groups if g.get(GATE_FLAG)]
    if not groups:
        raise ValueError(f"the optimizer has no SoRA gate group (a param group with {GATE_FLAG}=True)")
    return groups


def set_lambda(optimizer: torch.optim.Optimizer, lambda_: float, keep: int | None = None) -> None:
    """λ for the next step, and in budget mode how many gates it leaves non-zero (``keep``)."""
    for group in gate_groups(optimizer):
        group[LAMBDA] = lambda_
        group[KEEP] = keep


def last_lambda(optimizer: torch.optim.Optimizer) -> float:
    """The λ the last step used (in budget mode the one its threshold amounted to)."""
    return effective_lambda(gate_groups(optimizer)[0])


def mark_sharded(optimizer: torch.optim.Optimizer, sharded: bool) -> None:
    """Tell the gate step whether each rank steps only a shard of the gates (ZeRO-1/2/3)."""
    for group in gate_groups(optimizer):
        group[SHARDED] = sharded


def scale_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group (gates included) at ``factor`` times its own peak learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault(PEAK_LR, group["lr"]) * factor


def learning_rates(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(adapter lr, gate lr) of the current step."""
    gate = gate_groups(optimizer)[0]
    adapter = next((g for g in optimizer.param_groups if not g.get(GATE_FLAG)), gate)
    return adapter["lr"], gate["lr"]
