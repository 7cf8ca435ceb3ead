"""Who chooses λ at each optimizer step: a ramp (``schedule``) or budget mode (``budget``), both
behind the :class:`~sora_dist.sparsity.controller.LambdaController` protocol; their YAML sections
(``config``) and their pictures (``plots``)."""

from .budget import BudgetController
from .controller import LambdaController
from .schedule import LambdaSchedule

__all__ = ["BudgetController", "LambdaController", "LambdaSchedule"]
