"""SoRA under PyTorch FSDP2 (fully_shard, DTensor parameters) with 2 real processes over gloo,
checked against single-process runs of the same training.

tests/dist_worker.py runs with the FSDP settings `accelerate launch --config_file launch/fsdp2.yaml`
exports (dist_worker.FSDP2_ENV); the CLI test runs that very command. Worker defaults as in
test_training_distributed.py: 6 optimizer steps of 2 micro-batches, per-rank micro-batch 2 (the
one-process reference uses 4: the same 8 examples per step), gate lr 0.1, λ = 2, clipping at 1.0.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from helpers import BF16_MAX, FP32_ATOL, REPO, Result, launch, run_command, worker_env
from safetensors.torch import load_file
from test_training_distributed import (
    assert_bf16_close,
    assert_close,
    assert_gates_trained,
    assert_ranks_identical,
    crash_at_4_and_resume,
    worker_run_config,
    zero_pattern_mismatches,
)

pytestmark = pytest.mark.distributed

ONE = ("--backend", "single", "--micro-batch-size", "4")
VARIANTS = {
    "prox_adam": (),
    "prox_sgd": ("--gate-update", "prox_sgd"),
    "fixed_threshold": ("--threshold", "fixed", "--lambda", "0.05"),
    "budget": ("--budget", "20"),
    "variable_lengths": ("--variable-lengths",),
    "normalize_factors_l1": ("--normalize-factors", "--gate-l1", "1.0", "--lambda", "0.01"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_fsdp2_ranks_match_one_process(variant, dist_model_dir, tmp_path):
    """Adapter and gates after 6 steps equal the 1-process run (same zero pattern); both ranks hold the
    same full tensors; each rank steps half of the gates and holds half of the optimizer state."""
    options = VARIANTS[variant]
    launch(tmp_path / "one", dist_model_dir, *ONE, *options, nproc=1)
    launch(tmp_path / "two", dist_model_dir, "--backend", "fsdp2", *options)
    one, two = Result(tmp_path / "one"), Result(tmp_path / "two")
    assert [f["backend"] for f in two.facts] == ["fsdp2", "fsdp2"]
    assert_ranks_identical(two)
    # Measured: max |difference| 7e-7 .. 8e-6; variable lengths 1.8e-5, exactly what DDP gives there
    # (the per-rank token sums are added in another order than on one process).
    assert_close(two.tensors[0], one.tensors[0], FP32_ATOL, f"fsdp2 {variant} vs one process")
    assert zero_pattern_mismatches(two.gates, one.gates) == 0
    assert_close(two.adapter, one.adapter, FP32_ATOL, f"fsdp2 {variant} saved adapter")
    full = sum(g.numel() for g in two.gates.values())
    assert [f["gate_shard_numel"] for f in two.facts] == [full // 2, full // 2]  # r = 4: rows 0-1 and 2-3 of each gate
    # The adapter's optimizer state (exp_avg, exp_avg_sq) exists only for the rows a rank holds.
    alone = one.facts[0]["memory"]["optimizer_state"]
    for facts in two.facts:
        assert abs(facts["memory"]["optimizer_state"] - alone / 2) <= 0.01 * alone, (facts["memory"], alone)
    if variant == "prox_adam":
        assert_gates_trained(two)
    if variant == "budget":
        live = sum(int((g != 0).sum()) for g in two.gates.values())
        assert live <= 22, f"budget of 20 live ranks: {live} live"
    if variant == "normalize_factors_l1":
        # The scale-moving step really ran on the sharded rows: live ranks have ‖A_i‖ = 1 (whole rows, one rank)
        # and ‖B[:, i]‖ = 1 (a column split over both ranks: its norm needed the all-reduce).
        alive = 0
        for key, gate in two.gates.items():
            a = two.tensors[0][key.removesuffix("gate") + "lora_A"].norm(dim=1)
            b = two.tensors[0][key.removesuffix("gate") + "lora_B"].norm(dim=0)
            live = (gate != 0) & (a > 0)
            alive += int(live.sum())
            torch.testing.assert_close(a[live], torch.ones_like(a[live]), atol=1e-5, rtol=0)
            torch.testing.assert_close(b[live], torch.ones_like(b[live]), atol=1e-5, rtol=0)
        assert alive > 0


def test_qlora_fsdp2_shards_the_4bit_base_and_matches_one_process(dist_model_dir, tmp_path):
    """nf4 base stored as bf16 (bnb_4bit_quant_storage) under FSDP2 with bf16 compute: each rank holds half
    of every packed 4-bit weight as a DTensor, and training equals one process with the same 4-bit base."""
    common = ("--mixed-precision", "bf16")
    launch(tmp_path / "one", dist_model_dir, "--backend", "single_4bit", "--micro-batch-size", "4", *common, nproc=1)
    launch(tmp_path / "two", dist_model_dir, "--backend", "fsdp2_4bit", *common)
    one, two = Result(tmp_path / "one"), Result(tmp_path / "two")
    assert all(f["base_is_4bit"] for f in two.facts)
    packed = 32 * 32 // 4  # nf4: two weights per byte, stored in bf16 elements of 2 bytes
    assert [(f["base_weight_type"], f["base_weight_dtype"], f["base_shard_numel_in_training"]) for f in two.facts] == [
        ("DTensor", "torch.bfloat16", packed // 2)
    ] * 2
    assert one.facts[0]["base_shard_numel_in_training"] == packed
    assert_ranks_identical(two)
    assert_bf16_close(two.tensors[0], one.tensors[0], "4-bit FSDP2, 2 ranks vs 1")
    assert zero_pattern_mismatches(two.gates, one.gates) <= 2
    assert_gates_trained(two)
    assert max((two.adapter[k].float() - one.adapter[k].float()).abs().max().item() for k in one.adapter) <= BF16_MAX


def test_killed_fsdp2_run_resumes_bit_exact_and_merges_from_its_checkpoint(dist_model_dir, tmp_path):
    """kill -9 while checkpoint 4 is written (checkpoint 2 complete): the resumed run ends bit-identical to
    the straight run (dropout on: every rank's RNG and the data position come back). sora-merge of an FSDP2
    checkpoint equals the merge of the adapter saved at that step. The checkpoint holds the trainable
    tensors only, and reads onto one process (DCP reshards): resumed there, the run ends within rounding."""
    straight, crashed, other = tmp_path / "straight", tmp_path / "crashed", tmp_path / "other"
    common = ("--backend", "fsdp2", "--dropout", "0.1", "--save-every", "2")
    launch(straight, dist_model_dir, *common, "--save-adapter-at", "4")
    crash_at_4_and_resume(crashed, dist_model_dir, common)
    want, got = Result(straight).adapter, Result(crashed).adapter
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs after resume"

    # The checkpoint holds the trainable tensors and their optimizer state, never the frozen base.
    import torch.distributed.checkpoint as dcp

    checkpoint = straight / "train" / "checkpoints" / "step-00000004"
    keys = dcp.FileSystemReader(str(checkpoint / "fsdp2")).read_metadata().state_dict_metadata
    assert sorted(k.removeprefix("model/") for k in keys if k.startswith("model/")) == sorted(want)
    assert {k.rsplit("/", 1)[1] for k in keys if k.startswith("optim/")} == {"exp_avg", "exp_avg_sq", "step"}
    assert len(keys) == 4 * len(want)

    merged_ckpt, merged_adapter = tmp_path / "m_ckpt", tmp_path / "m_adapter"
    for adapter_path, out in ((checkpoint, merged_ckpt), (straight / "adapter-4", merged_adapter)):
        run_command([sys.executable, "-m", "sora_dist.cli", "merge", "--adapter", str(adapter_path), "--base", str(dist_model_dir), "--out", str(out)])
    a, b = load_file(str(merged_ckpt / "model.safetensors")), load_file(str(merged_adapter / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"merged {key}: checkpoint and saved adapter differ"
    plain = load_file(str(dist_model_dir / "model.safetensors"))
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], plain["model.layers.0.self_attn.q_proj.weight"])

    # Onto one process (micro-batch 4: the same 8 examples per step) from the 2-process checkpoint at step 2.
    nodrop = ("--backend", "fsdp2", "--save-every", "2")
    launch(other, dist_model_dir, *nodrop, "--crash-in-save", "4", expect_ok=False)
    launch(tmp_path / "straight_nodrop", dist_model_dir, *nodrop)
    one = launch(other, dist_model_dir, *nodrop, "--micro-batch-size", "4", nproc=1)
    assert "resuming on 1 processes from a checkpoint of 2" in one.stdout and "at step 2" in one.stdout, one.stdout[-2000:]
    assert_close(Result(other).adapter, Result(tmp_path / "straight_nodrop").adapter, FP32_ATOL, "resumed on 1 process vs 2")


def test_gradient_checkpointing_under_fsdp2_keeps_the_dropout_masks(dist_model_dir, tmp_path):
    """model.gradient_checkpointing (transformers' own, which restores the random state before recomputing)
    with dropout 0.1 trains bit-identically to the same FSDP2 run without it. (Accelerate's
    fsdp_activation_checkpointing recomputes with fresh random numbers, so it is refused with dropout.)"""
    common = ("--backend", "fsdp2", "--dropout", "0.1")
    launch(tmp_path / "plain", dist_model_dir, *common)
    launch(tmp_path / "recompute", dist_model_dir, *common, "--gradient-checkpointing")
    plain, recompute = Result(tmp_path / "plain"), Result(tmp_path / "recompute")
    for key, value in plain.tensors[0].items():
        assert torch.equal(recompute.tensors[0][key], value), f"{key} differs with gradient checkpointing"


def test_cli_accelerate_launch_fsdp2_yaml_matches_one_process(dist_model_dir, tmp_path):
    """The user path: `accelerate launch --config_file launch/fsdp2.yaml --num_processes 2 -m sora_dist.cli
    train run.yaml` on the CPU (fp32 here: --mixed_precision no) trains the 1-process adapter."""
    launch(tmp_path / "one", dist_model_dir, *ONE, nproc=1)
    config, out = worker_run_config(tmp_path, dist_model_dir)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", "launch/fsdp2.yaml", "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", "0", "-m", "sora_dist.cli", "train", str(run_yaml)]  # fmt: skip
    proc = run_command(cmd)
    assert "live ranks" in proc.stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 6
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert_close(adapter, Result(tmp_path / "one").adapter, FP32_ATOL, "accelerate launch fsdp2.yaml vs one process")


def test_fsdp2_evaluation_equals_one_process(tiny_model_dir, tmp_path):
    """sora-train's evaluation under FSDP2 (2 processes: every rank's forwards gather the sharded layers, and
    generation runs in lockstep) gives the 1-process run's held-out loss and generated-answer accuracy."""
    from helpers import write_config

    from sora_dist.cli import run, train_main

    config = write_config(tmp_path, tiny_model_dir, steps=4, eval_every=2)
    raw = yaml.safe_load(config.read_text())
    raw["sora"]["dropout"] = 0.0
    raw["data"]["eval_generate_tokens"] = 4
    raw["data"]["eval_batch_size"] = 2  # 6 validation rows: 3 batches on one process, uneven over two
    config.write_text(yaml.safe_dump(raw))
    assert run(train_main, [str(config), "--set", f"train.output_dir={tmp_path / 'one'}"]) == 0
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", "launch/fsdp2.yaml", "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", "0", "-m", "sora_dist.cli", "train", str(config),
           "--set", "train.micro_batch_size=2", "--set", f"train.output_dir={tmp_path / 'two'}"]  # fmt: skip
    run_command(cmd)

    def evaluations(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [row for row in rows if "eval_loss" in row]

    one, two = evaluations(tmp_path / "one"), evaluations(tmp_path / "two")
    assert [row["step"] for row in two] == [row["step"] for row in one] == [2, 4]
    for a, b in zip(one, two):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["generated_accuracy"] == a["generated_accuracy"]


@pytest.mark.parametrize(
    ("env", "train", "wanted"),
    [
        ({"FSDP_VERSION": "1"}, {}, "FSDP version 1 (fsdp_version: 1 in the Accelerate config) is not supported"),
        ({"FSDP_VERSION": "2"}, {"optimizer": "adamw_8bit"}, "train.optimizer: adamw_8bit does not run under FSDP2"),
        ({"FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, {}, "sora.dropout: 0.1 with fsdp_activation_checkpointing: true"),
        ({"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, {}, "fsdp_offload_params: true moves sharded state from the GPU"),
    ],
)
def test_what_fsdp_cannot_run_is_one_line_before_the_model_loads(env, train, wanted, tmp_path):
    from helpers import write_config

    config = write_config(tmp_path, tmp_path / "no_model_here", **train)  # never loaded: the refusal comes first
    proc = subprocess_cli(["train", str(config)], {"ACCELERATE_USE_FSDP": "true", **env})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and wanted in lines[0], lines
    assert not (tmp_path / "out").exists()


def subprocess_cli(argv: list[str], env: dict):
    import subprocess

    return subprocess.run([sys.executable, "-m", "sora_dist.cli", *argv], cwd=REPO, env={**worker_env(), **env}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
