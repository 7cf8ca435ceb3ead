"""Budget mode: the λ controller reaches a target live size by a given step and holds it."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_llama
from test_cli_train import tiny_model_dir, write_config  # noqa: F401  (fixture)

from sora_dist import SoRAConfig, inject_sora
from sora_dist.budget import BudgetController
from sora_dist.config import ConfigError, load_config
from sora_dist.distributed import build_accelerator
from sora_dist.sparsity import sparsity_report
from sora_dist.train import TrainConfig, train

BY_STEP = 70
TOLERANCE = 0.10  # of the initial live count


@pytest.mark.parametrize("fraction", [0.4, 0.2])
def test_controller_reaches_the_target_by_by_step_and_holds_it(fraction):
    """Tiny Llama (14 modules, r=4, 8192 adapter parameters): the live count is within ±10% of the
    initial count of the target at by_step and never more than 10% of it below the target after."""
    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    inject_sora(model, SoRAConfig(r=4, alpha=8), verbose=False)
    data = [{"input_ids": torch.randint(3, 120, (16,), generator=torch.Generator().manual_seed(i))} for i in range(32)]
    start = sparsity_report(model).params
    target = fraction * start
    controller = BudgetController(target, BY_STEP, lambda: sparsity_report(model).params, lambda_max=2.0)
    config = TrainConfig(steps=100, micro_batch_size=4, lr=1e-2, gate_lr=0.03, lr_decay="constant", log_every=0)
    train(model, data, config, build_accelerator(), lambdas=controller)
    counts = {step: count for step, count, _ in controller.history}
    assert controller.start_count == start
    assert abs(counts[BY_STEP] - target) <= TOLERANCE * start, (counts[BY_STEP], target)
    after = [counts[s] for s in counts if s >= BY_STEP]
    assert min(after) >= target - TOLERANCE * start, (min(after), target)
    assert max(lam for _, _, lam in controller.history) <= 2.0
    assert sparsity_report(model).params == counts[100]


def test_control_law_and_state_dict_round_trip():
    counts = iter([100, 100, 90, 40, 30, 35, 60])
    controller = BudgetController(40, 4, lambda: next(counts), lambda_max=2.0, trajectory="linear")

    class Opt:
        param_groups = [{"sora_gate": True, "prox_lambda": 0.0}]

    opt = Opt()
    assert controller.apply(opt) == 0.0 and controller.start_count == 100
    assert controller.reference(0) == 100 and controller.reference(2) == 70 and controller.reference(9) == 40
    lams = [controller.step(opt) for _ in range(3)]
    assert lams[0] == pytest.approx(0.025) and lams[1] > lams[0]  # above plan: λ rises
    assert opt.param_groups[0]["prox_lambda"] == lams[-1]
    state = json.loads(json.dumps(controller.state_dict()))
    clone = BudgetController(1, 1, None)
    clone.load_state_dict(state)
    assert clone.state_dict() == controller.state_dict()
    with pytest.raises(ValueError, match="fixed lambda schedule"):
        clone.load_state_dict({"kind": "constant", "start": 0.1, "end": 0.1, "steps": 0, "step_count": 3})
    # At/below the target λ falls, but never below hold·λ_max once it got there.
    controller.lam = 2.0
    for count in (30, 30, 30, 30, 30, 30):
        controller.update(count)
    assert controller.lam == pytest.approx(1.4)


def _raw(**budget):
    return {
        "model": {"path": "m"},
        "data": {"train_file": "t.jsonl"},
        "sora": {"r": 4},
        "train": {"steps": 50},
        "sparsity_budget": budget,
    }


@pytest.mark.parametrize(
    "budget, message",
    [
        ({"by_step": 10}, "sparsity_budget.target_rank: give exactly one"),
        ({"target_rank": 2, "target_params": 100, "by_step": 10}, "sparsity_budget.target_rank: give exactly one"),
        ({"target_rank": 2}, "sparsity_budget.by_step: required"),
        ({"target_rank": 2, "by_step": 60}, r"sparsity_budget.by_step: must be <= train.steps=50"),
        ({"target_rank": 5, "by_step": 10}, r"sparsity_budget.target_rank: must be <= sora.r=4"),
        ({"target_params": -1, "by_step": 10}, "sparsity_budget.target_params: must be >= 0"),
        ({"target_rank": 2, "by_step": 10, "lambda_max": 0}, "sparsity_budget.lambda_max"),
        ({"target_rank": 2, "by_step": 10, "trajectory": "cosine"}, "sparsity_budget.trajectory"),
        ({"target_rank": 2, "by_step": 10, "lambda": 1}, "sparsity_budget.lambda: unknown key"),
    ],
)
def test_config_errors_name_the_key(budget, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw=_raw(**budget))


def test_budget_and_sparsity_schedule_are_exclusive():
    raw = _raw(target_rank=2, by_step=10)
    raw["sparsity_schedule"] = {"kind": "list", "values": [0.1, 0.5]}
    raw["data"]["validation_fraction"] = 0.25
    with pytest.raises(ConfigError, match="sparsity_budget: cannot be combined with sparsity_schedule"):
        load_config(raw=raw)
    assert load_config(raw=_raw(target_rank=2, by_step=10)).sparsity_budget.target_rank == 2


def test_cli_budget_run_writes_budget_png(tiny_model_dir, tmp_path):  # noqa: F811
    import yaml

    from sora_dist.cli import run, train_main

    path = write_config(tmp_path, tiny_model_dir, steps=12, gate_lr=0.03, lambda_start=0.0)
    config = yaml.safe_load(path.read_text())
    config["sparsity_budget"] = {"target_rank": 2, "by_step": 10, "lambda_max": 2.0}
    path.write_text(yaml.safe_dump(config))
    assert run(train_main, [str(path)]) == 0
    out = tmp_path / "out"
    assert (out / "budget.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budget"]["unit"] == "live_ranks" and summary["budget"]["target"] == 2 * 14
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lams = [r["lambda"] for r in records if r["kind"] == "train"]
    assert len(lams) == 12 and max(lams) > 0
