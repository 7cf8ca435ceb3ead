"""The sora-train recipe: a config error in any λ, gate or budget key stops the run before the
tokenizer, the data or the model are touched, and nothing is written; the config.yaml a run writes
is the config it used."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from helpers import write_config

from sora_dist.cli import run, train_main
from sora_dist.config import load_config

BAD_KEYS = [
    ({"train": {"lambda_kind": "cosine"}}, "train.lambda_kind: must be one of"),
    ({"train": {"lambda_start": float("nan")}}, "train.lambda_start: lambda must be >= 0 and finite"),
    ({"train": {"lambda_start": -0.5}}, "train.lambda_start: lambda must be >= 0"),
    ({"train": {"lambda_kind": "geometric", "lambda_start": 0.0, "lambda_steps": 5}}, "train.lambda_start: a geometric lambda ramp"),
    ({"train": {"lambda_kind": "linear", "lambda_end": 1.0}}, "train.lambda_steps: a linear lambda ramp needs steps >= 1"),
    ({"train": {"gate_update": "adam"}}, "train.gate_update: must be one of"),
    ({"train": {"threshold": "hard"}}, "train.threshold: must be one of"),
    ({"train": {"gate_lr": -1.0}}, "train.gate_lr: must be a finite number in [0, 3.40e+38]"),
    ({"train": {"gate_lr": float("inf")}}, "train.gate_lr: must be a finite number in [0, 3.40e+38]"),
    ({"sparsity_budget": {"target_rank": 2, "by_step": 5, "lambda_max": 0.5}}, "sparsity_budget.lambda_max: must be > 1"),
    ({"sparsity_budget": {"target_rank": 2, "by_step": 5, "trajectory": "cosine"}}, "sparsity_budget.trajectory: must be one of"),
    ({"sparsity_budget": {"target_rank": 2, "by_step": 500}}, "sparsity_budget.by_step: must be <= train.steps"),
    ({"sparsity_budget": {"target_rank": -1, "by_step": 5}}, "sparsity_budget.target_rank: must be >= 0"),
    ({"sparsity_schedule": {"kind": "list", "values": [1.0, 0.5]}}, "sparsity_schedule.values: lambdas must be >= 0 and non-decreasing"),
]


@pytest.mark.parametrize("change, message", BAD_KEYS, ids=[m.split(":")[0] for _, m in BAD_KEYS])
def test_lambda_gate_and_budget_errors_stop_before_anything_loads(change, message, tmp_path, capsys):
    """The model path does not exist: had the run got as far as loading, the error would name
    model.path. It names the bad key instead, and the output folder is never created."""
    out = tmp_path / "out"
    raw = {
        "model": {"path": str(tmp_path / "no-such-model")},
        "data": {"train_file": str(tmp_path / "no-such-data.jsonl"), "validation_fraction": 0.25},
        "train": {"steps": 20, "output_dir": str(out)},
    }
    for section, values in change.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run(train_main, [str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "model.path" not in err, err
    assert not out.exists()


def test_duplicate_yaml_key_is_refused_with_its_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  path: m\ndata:\n  train_file: t.jsonl\ntrain:\n  lr: 1.0e-4\n  lr: 1.0e-3\n")
    assert run(train_main, [str(path)]) == 2
    assert f"{path}:7: invalid YAML: duplicate key 'lr'" in capsys.readouterr().err


def test_config_yaml_is_the_config_the_run_used_in_budget_mode(tiny_model_dir, tmp_path):
    """Budget mode picks the gate lr after the model loads; config.yaml records that resolved value,
    and it is the one the training loop used (the adapter's sora_config.json keeps the loop's
    TrainConfig)."""
    path = write_config(tmp_path, tiny_model_dir, steps=12, gate_lr=None)
    raw = yaml.safe_load(path.read_text())
    raw["sparsity_budget"] = {"target_rank": 2, "by_step": 8}
    path.write_text(yaml.safe_dump(raw))
    assert run(train_main, [str(path)]) == 0
    out = tmp_path / "out"
    saved = load_config(out / "config.yaml")
    used = json.loads((out / "adapter" / "sora_config.json").read_text())["train"]
    assert saved.train.gate_lr is not None and saved.train.gate_lr == used["gate_lr"]
    assert dataclasses.asdict(saved.train) == used
    assert saved.to_dict() == {**load_config(path).to_dict(), "train": used}
