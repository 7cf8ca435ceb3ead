"""Budget mode (sora_dist.sparsity.budget): the live adapter follows the planned size to its target
and holds it, in live ranks or adapter parameters; the keep threshold, the budget step and the
automatic gate lr against hand computations; the controller's state round trip; the
sparsity_budget config checks; sora-train in budget mode, in one process and on ZeRO-2/3 shards."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import launch_cli_two_processes, tiny_llama, write_config
from safetensors.torch import load_file

from sora_dist import SoRAConfig, inject_sora
from sora_dist.backends.accelerate import build_accelerator
from sora_dist.config import ConfigError, load_config
from sora_dist.core.optim import SoRAOptimizer, effective_lambda, keep_threshold, soft_threshold_all_
from sora_dist.core.report import sparsity_report
from sora_dist.sparsity.budget import BudgetController, gate_lr_for_budget
from sora_dist.training.config import TrainConfig
from sora_dist.training.loop import train
from sora_dist.training.lr import lr_factor

BY_STEP = 70


def _train_tiny_llama(target_fraction: float, unit: str, steps: int = 100) -> tuple[BudgetController, object, int]:
    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    inject_sora(model, SoRAConfig(r=4, alpha=8), verbose=False)
    data = [{"input_ids": torch.randint(3, 120, (16,), generator=torch.Generator().manual_seed(i))} for i in range(32)]
    report = sparsity_report(model)
    start = report.params if unit == "adapter_params" else report.live_rank
    config = TrainConfig(steps=steps, micro_batch_size=4, lr=1e-2, lr_decay="constant", log_every=0)
    config.gate_lr = gate_lr_for_budget(model, [lr_factor(s, config) for s in range(steps)], BY_STEP, lambda_max=2.0)
    controller = BudgetController(model, target_fraction * start, BY_STEP, unit, lambda_max=2.0)
    train(model, data, config, build_accelerator(), lambdas=controller)
    return controller, model, start


def test_live_ranks_follow_the_plan_exactly_wherever_lambda_is_under_its_cap():
    """Tiny Llama (14 modules, r=4: 56 ranks), target 40% of the ranks by step 70: after every step the
    live count is never below the plan's ranks, equals them whenever the step's λ stayed under
    λ_max, lands on the target by step 70 and stays there."""
    controller, model, start = _train_tiny_llama(0.4, "live_ranks")
    plan = lambda step: math.floor(0.4 * start + 0.6 * start * max(0.0, 1 - step / BY_STEP) ** 3 + 1e-6)  # noqa: E731
    target = plan(BY_STEP)
    capped = 0
    for step, count, lam in controller.history:
        assert count >= plan(step), (step, count, plan(step))
        if lam < 2.0 - 1e-5:  # under the cap (τ is float32)
            assert count == plan(step), (step, count, lam)
        else:
            capped += 1
    counts = {step: count for step, count, _ in controller.history}
    assert all(counts[s] == target for s in counts if s >= BY_STEP), counts
    assert capped < BY_STEP  # the automatic gate lr leaves the cap room to work
    assert sparsity_report(model).live_rank == target


@pytest.mark.parametrize("fraction", [0.4, 0.2])
def test_parameter_budget_lands_within_one_rank_of_the_target_and_holds(fraction):
    """In adapter parameters (ranks of different modules differ in d_in + d_out) the count at step 70
    and after is at or under the target by less than the largest rank's parameters."""
    controller, model, start = _train_tiny_llama(fraction, "adapter_params")
    largest_rank = max(m.in_features + m.out_features for m in sparsity_report(model).modules)
    target = fraction * start
    after = [count for step, count, _ in controller.history if step >= BY_STEP]
    assert all(target - 2 * largest_rank <= count <= target + largest_rank for count in after), (after, target, largest_rank)
    assert max(lam for _, _, lam in controller.history) <= 2.0 + 1e-6  # τ is float32
    assert controller.state_dict()["last_count"] == sparsity_report(model).params


def test_keep_threshold_is_the_smallest_tau_that_keeps_k_gates():
    """Independent check by sorting: S_τ with the returned τ leaves exactly k non-zero, and any
    smaller τ leaves more."""
    gates = [torch.randn(8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for keep in (0, 1, 7, 23, 24, 30):
        tau = keep_threshold(gates, keep)
        magnitudes = torch.cat(gates).abs().sort(descending=True).values
        expected = 0.0 if keep >= magnitudes.numel() else float(magnitudes[keep])
        assert float(tau) == expected
        shrunk = [g.clone() for g in gates]
        soft_threshold_all_(shrunk, tau)
        assert sum(int((g != 0).sum()) for g in shrunk) == min(keep, 24)


def test_budget_step_on_a_hand_computed_example():
    """prox_sgd, lr 0.1: z = g - 0.1·grad = [0.45, -0.3, 0.04, 0.9]; keep 2 -> τ = 0.3 (the third largest
    |z|), capped at lr·λ_max = 0.5: S_0.3(z) = [0.15, 0, 0, 0.6]. keep 0 with the same cap: τ = 0.5."""
    gate = torch.nn.Parameter(torch.tensor([0.5, -0.2, 0.05, 1.0]))
    gate.grad = torch.tensor([0.5, 1.0, 0.1, 1.0])
    group = {"params": [gate], "lr": 0.1, "sora_gate": True, "gate_update": "prox_sgd", "prox_lambda": 5.0, "prox_keep": 2}
    optimizer = SoRAOptimizer([group])
    optimizer.step()
    assert torch.allclose(gate.detach(), torch.tensor([0.15, 0.0, 0.0, 0.6]))
    assert effective_lambda(optimizer.param_groups[0]) == pytest.approx(3.0)
    gate.data = torch.tensor([0.5, -0.2, 0.05, 1.0])
    optimizer.param_groups[0].update(prox_keep=0, prox_lambda=5.0)
    optimizer.step()
    assert torch.allclose(gate.detach(), torch.tensor([0.0, 0.0, 0.0, 0.4]))
    assert effective_lambda(optimizer.param_groups[0]) == pytest.approx(5.0)


def test_state_dict_round_trip_and_wrong_checkpoint():
    model = tiny_llama(seed=0)
    inject_sora(model, SoRAConfig(r=4, alpha=8), verbose=False)
    controller = BudgetController(model, 20, 10, "live_ranks", lambda_max=2.0, trajectory="linear")
    group = {"sora_gate": True, "prox_lambda": 0.0, "lr": 0.1, "threshold": "lr_scaled"}

    class Opt:
        param_groups = [group]

    controller.apply(Opt())
    assert controller.start_count == 56 and group["prox_keep"] == math.floor(20 + 36 * 0.9 + 1e-6) and group["prox_lambda"] == 2.0
    group["prox_tau"] = torch.tensor(0.05)
    assert controller.step(Opt()) == pytest.approx(0.5) and controller.history == [(1, 56.0, pytest.approx(0.5))]
    state = json.loads(json.dumps(controller.state_dict()))
    clone = BudgetController(model, 1, 1)
    clone.load_state_dict(state)
    assert clone.state_dict() == controller.state_dict()
    with pytest.raises(ValueError, match="fixed lambda schedule"):
        clone.load_state_dict({"kind": "constant", "start": 0.1, "end": 0.1, "steps": 0, "step_count": 3})


def test_gate_lr_for_budget_closed_form():
    """margin · mean|g| / ((λ_max − 1) · Σ_{t<by_step} factor_t); λ_max <= 1 is refused."""
    model = tiny_llama(seed=0)
    inject_sora(model, SoRAConfig(r=4, alpha=8, gate_init="ones"), verbose=False)
    assert gate_lr_for_budget(model, [0.5] * 10 + [1.0] * 10, 8, lambda_max=3.0) == pytest.approx(2 * 1.0 / (2 * 4.0))
    with pytest.raises(ValueError, match="lambda_max > 1"):
        gate_lr_for_budget(model, [1.0] * 10, 8, lambda_max=1.0)


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


def test_cli_budget_run_picks_the_gate_lr_reaches_the_target_and_writes_budget_png(tiny_model_dir, tmp_path, capsys):
    """Without train.gate_lr the recipe chooses one (and says so); with it the 12-step run is on its
    target of 2 ranks per module from by_step=10 on, and λ never exceeds lambda_max."""
    import yaml

    from sora_dist.cli import run, train_main

    path = write_config(tmp_path, tiny_model_dir, steps=12, lambda_start=0.0)
    config = yaml.safe_load(path.read_text())
    del config["train"]["gate_lr"]
    config["sparsity_budget"] = {"target_rank": 2, "by_step": 10}
    path.write_text(yaml.safe_dump(config))
    assert run(train_main, [str(path)]) == 0
    assert "budget mode: gate learning rate" in capsys.readouterr().out
    out = tmp_path / "out"
    assert (out / "budget.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budget"] == {"target": 28.0, "unit": "live_ranks", "by_step": 10, "reached": 28.0}
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["live_ranks"] for r in records if r["step"] >= 10] == [28, 28, 28]
    assert len(records) == 12 and 0 < max(r["lambda"] for r in records) <= 2.0 + 1e-6


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("ds_config", ["ds_configs/zero2.json", "ds_configs/zero3.json"])
def test_budget_mode_on_zero_shards_matches_one_process(ds_config, tiny_model_dir, tmp_path):
    """ZeRO-2/3 on 2 processes, each stepping a shard of the gate group: the threshold gathers every
    shard's values, so the live ranks logged at every step and the adapter equal the one-process run
    (same global batch, no dropout)."""
    import yaml

    from sora_dist.cli import run, train_main

    path = write_config(tmp_path, tiny_model_dir, steps=12, gate_lr=0.05, lambda_start=0.0)
    config = yaml.safe_load(path.read_text())
    config["sora"]["dropout"] = 0.0
    config["sparsity_budget"] = {"target_rank": 2, "by_step": 10}
    path.write_text(yaml.safe_dump(config))
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(train_main, [str(path), "--set", f"train.output_dir={one}"]) == 0
    proc = launch_cli_two_processes(path, "train.micro_batch_size=2", f"train.output_dir={two}", f"distributed.deepspeed_config={ds_config}")
    assert proc.returncode == 0, proc.stderr[-6000:]

    def live(out):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["live_ranks"]) for r in records if r["kind"] == "train"]

    assert live(two) == live(one) and live(one)[-1][1] == 2 * 14
    ours, theirs = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (two, one))
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-4, rtol=0)
