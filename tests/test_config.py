"""The run configuration of sora-train (sora_dist.config): a wrong key, type or value fails with
the key's path and what is allowed; ``--set`` overrides; an unknown section and invalid YAML are
named with their place."""

from __future__ import annotations

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
