"""The run configuration of sora-train (sora_dist.config): a wrong key, type or value fails with
the key's path and what is allowed; ``--set`` overrides; an unknown section and invalid YAML are
named with their place."""

from __future__ import annotations

from pathlib import Path

import pytest

from sora_dist.config import ConfigError, load_config

BASE = {"model": {"path": "some/model"}, "data": {"train_file": "train.jsonl"}}


@pytest.mark.parametrize(
    "section, value, message",
    [
        ("train", {"lrr": 1e-4}, r"^train\.lrr: unknown key; allowed keys: .*\blr\b"),
        ("train", {"lr": "fast"}, r"^train\.lr: expected float, got str 'fast'"),
        ("train", {"steps": 2.5}, r"^train\.steps: expected int"),
        ("sora", {"r": 0}, r"^sora\.r: must be a positive integer"),
        ("sora", {"gate_init": "zeros"}, r"^sora\.gate_init: must be one of"),
        ("data", {"train_file": "t.jsonl", "format": "xml"}, r"^data\.format: must be one of \['instruction', 'chat', 'text', 'classification', 'blocks'\]"),
        ("model", {"path": "m", "quantization": "3bit"}, r"^model\.quantization: must be one of"),
        ("model", {}, r"^model\.path: required"),
    ],
)
def test_config_errors_name_the_key(section, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw={**BASE, section: value})


def test_config_overrides_and_unknown_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  path: some/model\ndata:\n  train_file: t.jsonl\ntrain:\n  lr: 1.0e-4\n")
    config = load_config(path, overrides=["train.lr=3e-4", "sora.target_modules=[q_proj, v_proj]"])
    assert config.train.lr == 3e-4 and config.sora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"^optimiser: unknown section"):
        load_config(raw={**BASE, "optimiser": {}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(bad)


@pytest.mark.parametrize("example", sorted(p.name for p in (Path(__file__).parents[1] / "examples").glob("*.yaml")))
def test_every_example_config_validates(example, monkeypatch):
    """The shipped configs load as they are (with train.epochs, steps are known only once the data
    is, so warm-up and budget steps are checked against them then)."""
    repo = Path(__file__).parents[1]
    monkeypatch.chdir(repo)
    config = load_config(repo / "examples" / example)
    assert config.model.path and config.train.steps >= 1


def test_warmup_past_the_steps_of_the_epochs_is_named_once_they_are_known():
    import dataclasses

    from sora_dist.recipe import steps_from_epochs

    raw = {"model": {"path": "m"}, "data": {"train_file": "t.jsonl"}, "train": {"epochs": 1, "warmup_steps": 20, "micro_batch_size": 4}}
    config = load_config(raw=raw)
    assert steps_from_epochs(config, 400, 1, main=False).train.steps == 100
    with pytest.raises(ConfigError, match=r"train\.epochs: 1 epochs make 10 steps: train\.warmup_steps: must be in \[0, steps=10\)"):
        steps_from_epochs(config, 40, 1, main=False)
    budget = dataclasses.replace(config, train=dataclasses.replace(config.train, warmup_steps=0))
    budget.sparsity_budget = load_config(raw={**raw, "sparsity_budget": {"target_rank": 2, "by_step": 50}}).sparsity_budget
    with pytest.raises(ConfigError, match=r"sparsity_budget\.by_step: 50 is past the 10 steps"):
        steps_from_epochs(budget, 40, 1, main=False)
