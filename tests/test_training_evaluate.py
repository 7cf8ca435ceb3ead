"""Evaluation is split across ranks and summed: 2 processes (DDP and ZeRO-3) report the validation
loss of one process evaluating everything."""

from __future__ import annotations

import json

import pytest
from helpers import launch_cli_two_processes, write_config

from sora_dist.cli import run, train_main

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def eval_losses(out) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in records if r["kind"] == "eval"]


@pytest.mark.parametrize("ds_config", [None, "ds_configs/zero3.json"])
def test_two_ranks_report_the_validation_loss_of_one(ds_config, tiny_model_dir, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = write_config(tmp_path / "one", tiny_model_dir, eval_every=2)
    assert run(train_main, [str(one), "--set", "sora.dropout=0.0"]) == 0
    two = write_config(tmp_path / "two", tiny_model_dir, eval_every=2, micro_batch_size=2)
    overrides = ["sora.dropout=0.0"] + ([f"distributed.deepspeed_config={ds_config}"] if ds_config else [])
    proc = launch_cli_two_processes(two, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = eval_losses(tmp_path / "one" / "out"), eval_losses(tmp_path / "two" / "out")
    assert len(want) == len(got) == 2
    assert got == pytest.approx(want, rel=1e-5)
