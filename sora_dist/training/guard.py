"""The NaN guard: a non-finite loss stops every rank before anything is written from that state."""

from __future__ import annotations

import torch

from ..backends.fsdp2 import canonical_name
from ..core.optim import local_tensor
from ..deploy.layout import latest_checkpoint
from .config import TrainConfig


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the run stopped before writing anything from that state."""


class FiniteGuard:
    """Remembers, on the device, the first optimizer step whose loss was NaN or inf.

    :meth:`observe` runs every step without a host sync or a collective; :meth:`check` (two scalar
    all-reduces and one sync, also covering every trained parameter) runs before anything is logged,
    evaluated or written, so a checkpoint or adapter is never made from a broken state and every
    rank stops together.
    """

    def __init__(self, accelerator, config: TrainConfig, model=None):
        self.accelerator, self.config = accelerator, config
        self.first_bad = torch.zeros((), dtype=torch.long, device=accelerator.device)
        self.trained = [(canonical_name(name), p) for name, p in model.named_parameters() if p.requires_grad] if model is not None else []

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where((self.first_bad == 0) & bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, step: int) -> None:
        """The loss since the last check, and every trained parameter now (a finite loss can come
        with a non-finite update, e.g. an lr of 1e30): two scalar all-reduces and one host sync."""
        never = torch.full_like(self.first_bad, self.config.steps + 1)
        first = torch.where(self.first_bad > 0, self.first_bad, never)
        minus_first, parameters_bad = -first, self._parameters_bad()
        if self.accelerator.num_processes > 1:  # the earliest bad loss, any bad parameter: two scalar reductions
            minus_first = self.accelerator.reduce(minus_first, reduction="max")
            parameters_bad = self.accelerator.reduce(parameters_bad, reduction="max")
        minus_first, parameters_bad = torch.stack([minus_first, parameters_bad]).tolist()
        if -minus_first <= self.config.steps:
            last = latest_checkpoint(self.config.output_dir) if self.config.output_dir else None
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise NonFiniteLoss(
                f"loss is not finite since optimizer step {-minus_first}; at step {step}: stopping; {where}. "
                "Lower train.lr or train.max_grad_norm (or check the data) and resume"
            )
        if parameters_bad:
            bad = next((name for name, p in self.trained if not bool(torch.isfinite(local_part(p)).all())), None)
            key = "train.gate_lr (the gate learning rate)" if bad is not None and bad.endswith(".gate") else "train.lr"
            what = f"parameter {bad}" if bad is not None else "a parameter of another rank"
            raise NonFiniteLoss(
                f"the update of step {step} or before made {what} NaN or inf although the loss was finite: "
                f"lower {key} or set train.max_grad_norm; nothing was written from this state"
            )

    def _parameters_bad(self) -> torch.Tensor:
        """1 on the device if a trained parameter (this rank's part of it) holds NaN or inf, else 0."""
        device = self.first_bad.device
        if not self.trained:
            return torch.zeros((), dtype=torch.long, device=device)
        finite = [torch.isfinite(local_part(p)).all().to(device) for _, p in self.trained]
        return (~torch.stack(finite).all()).long()


def local_part(param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``param``: its ZeRO-3 partition, its FSDP2 block of rows, or the tensor itself."""
    return local_tensor(getattr(param, "ds_tensor", param).detach())


def guard_due(step: int, config: TrainConfig, evaluating: bool) -> bool:
    """Steps at which the loop logs, evaluates, saves or ends: the FiniteGuard checks there."""
    return (
        step == config.steps
        or bool(config.log_every and step % config.log_every == 0)
        or bool(evaluating and config.eval_every and step % config.eval_every == 0)
        or bool(config.save_every and step % config.save_every == 0)
    )
