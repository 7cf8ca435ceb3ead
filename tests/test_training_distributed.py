"""Distributed SoRA with 2 real processes over gloo, checked against single-process runs.

Each test launches tests/dist_worker.py (torchrun; the CLI test launches sora-train itself under
accelerate launch or the deepspeed launcher) on the tiny Llama of conftest.dist_model_dir and
compares what the ranks wrote. Shared settings (worker defaults): 6 optimizer steps,
2 micro-batches of accumulation, per-rank micro-batch 2 (the one-process reference uses 4, so every
step sees the same 8 examples), gate lr 0.1 with λ = 2 (prox_adam, lr-scaled threshold: large
enough to zero about half the gates in 6 steps), gradient clipping at 1.0.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import BF16_MAX, BF16_P99, FP32_ATOL, Result, free_port, launch, run_command
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def reference(dist_model_dir, tmp_path_factory) -> Result:
    """One process, plain PyTorch, the whole global batch per micro-batch."""
    out = tmp_path_factory.mktemp("reference")
    launch(out, dist_model_dir, "--backend", "single", "--micro-batch-size", "4", nproc=1)
    return Result(out)


def assert_ranks_identical(result: Result) -> None:
    assert len(result.tensors) == 2
    for key, value in result.tensors[0].items():
        assert torch.equal(value, result.tensors[1][key]), f"{key} differs between rank 0 and rank 1"


def differences(got: dict, want: dict, what: str) -> torch.Tensor:
    """|got - want| of every element, after checking that names and (full, never empty) shapes agree."""
    assert sorted(got) == sorted(want), f"{what}: different tensor names"
    for key, value in want.items():
        assert got[key].shape == value.shape, f"{what}: {key} has shape {tuple(got[key].shape)}, expected {tuple(value.shape)}"
    return torch.cat([(got[k].float() - want[k].float()).abs().flatten() for k in want])


def assert_close(got: dict, want: dict, atol: float, what: str) -> None:
    worst = differences(got, want, what).max().item()
    assert worst <= atol, f"{what}: max |difference| {worst:.3g} > {atol}"


def assert_bf16_close(got: dict, want: dict, what: str) -> None:
    diff = differences(got, want, what)
    assert diff.max().item() <= BF16_MAX, f"{what}: max |difference| {diff.max().item():.3g} > {BF16_MAX}"
    assert torch.quantile(diff, 0.99).item() <= BF16_P99, f"{what}: 99th percentile of |difference| > {BF16_P99}"


def zero_pattern_mismatches(a: dict, b: dict) -> int:
    return sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a)


def assert_gates_trained(result: Result) -> None:
    """The proximal step really ran: every gate moved and λ = 2 drove many exactly to zero."""
    tensors = result.tensors[0]
    for key, gate in result.gates.items():
        initial = tensors[key.removesuffix("gate") + "initial_gate"]
        assert not torch.equal(gate, initial), f"{key} never changed: the gate update did not run"
    zeros = sum(int((g == 0).sum()) for g in result.gates.values())
    total = sum(g.numel() for g in result.gates.values())
    assert zeros >= total // 4, f"only {zeros}/{total} gates are exactly zero with lambda = 2"


@pytest.mark.parametrize("backend", ["ddp", "zero0", "zero1", "zero2", "zero3", "zero3_offload"])
def test_two_ranks_match_one_process(backend, dist_model_dir, reference, tmp_path):
    """Same seed and global batch: gates and adapters equal the 1-process run; ranks bit-identical."""
    launch(tmp_path, dist_model_dir, "--backend", backend)
    result = Result(tmp_path)
    assert [f["world_size"] for f in result.facts] == [2, 2]
    assert_ranks_identical(result)
    assert_close(result.tensors[0], reference.tensors[0], FP32_ATOL, f"{backend} vs one process")
    assert zero_pattern_mismatches(result.gates, reference.gates) == 0
    assert_gates_trained(result)
    # The file save_sora wrote (gathered on every rank, written by rank 0) matches too.
    assert_close(result.adapter, reference.adapter, FP32_ATOL, f"{backend} saved adapter")
    if backend.startswith("zero"):
        assert result.facts[0]["backend"] == "deepspeed-" + backend.split("_")[0]
        full = sum(g.numel() for g in result.gates.values())
        # ZeRO-0 steps whole gates; ZeRO-1/2/3 step this rank's flat fp32 shard of the gate group.
        expected = full if backend == "zero0" else full // 2
        assert [f["gate_shard_numel"] for f in result.facts] == [expected, expected]
    if backend.startswith("zero3"):
        # from_pretrained ran under ZeRO-3 init: the base weights were never whole on a rank.
        assert all(f["base_partitioned_at_load"] and f["base_local_numel_at_load"] == 0 for f in result.facts)


def test_zero3_4bit_base_two_ranks_match_one_rank(dist_model_dir, tmp_path):
    """nf4 base with bf16 storage under ZeRO-3 (bf16): the 4-bit weight is partitioned and trains."""
    one, two = tmp_path / "one", tmp_path / "two"
    # Shard every tensor: by default ZeRO-3 keeps tensors below 10 x hidden (this packed weight) whole.
    common = ("--backend", "zero3_4bit", "--mixed-precision", "bf16", "--zero-option", "stage3_param_persistence_threshold=0")
    launch(one, dist_model_dir, *common, "--micro-batch-size", "4", nproc=1)
    launch(two, dist_model_dir, *common, "--micro-batch-size", "2")
    one, two = Result(one), Result(two)
    assert all(f["base_is_4bit"] for f in two.facts)
    packed = one.facts[0]["base_shard_numel_in_training"]
    assert packed == 32 * 32 // 4  # nf4 packs 4 weights into one bf16 element
    assert [(f["base_local_numel_in_training"], f["base_shard_numel_in_training"]) for f in two.facts] == [(0, packed // 2)] * 2
    assert_ranks_identical(two)
    assert_bf16_close(two.tensors[0], one.tensors[0], "4-bit ZeRO-3, 2 ranks vs 1")
    assert zero_pattern_mismatches(two.gates, one.gates) <= 2
    assert_gates_trained(two)
    assert_bf16_close(two.adapter, one.adapter, "4-bit ZeRO-3 saved adapter")


@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_killed_run_resumes_to_the_same_adapter(backend, dist_model_dir, tmp_path):
    """Kill a run while it writes checkpoint 4 (checkpoint 2 is complete); the resumed run ends bit-identical.

    Dropout is on, so the resume must also restore every rank's RNG and the data position.
    """
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    common = ("--backend", backend, "--dropout", "0.1", "--save-every", "2")
    launch(straight, dist_model_dir, *common)
    crash_at_4_and_resume(crashed, dist_model_dir, common)
    want, got = Result(straight).adapter, Result(crashed).adapter
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs after resume"


def crash_at_4_and_resume(out: Path, model_dir: Path, common: tuple[str, ...]) -> None:
    """Kill every rank while checkpoint 4 is written (checkpoint 2 complete), then rerun: it resumes at step 2."""
    killed = launch(out, model_dir, *common, "--crash-in-save", "4", expect_ok=False)
    assert killed.returncode != 0
    checkpoints = out / "train" / "checkpoints"
    assert (checkpoints / "step-00000002" / "sora_state.json").is_file()
    assert (checkpoints / ".step-00000004.tmp").is_dir() and not (checkpoints / "step-00000004").exists()
    resumed = launch(out, model_dir, *common)
    assert "at step 2" in resumed.stdout, resumed.stdout[-2000:]


def worker_run_config(tmp_path: Path, model_dir: Path) -> tuple[dict, Path]:
    """(run config, its output folder): sora-train settings equal to the worker's defaults on its token
    data (data.format blocks of 16 tokens, SoRA r=4 alpha 8 without dropout, 6 steps of micro-batch 2 x 2
    accumulation per rank, lr 1e-2, gate lr 0.1, λ = 2, the worker's seed)."""
    from dist_worker import SEED, token_data

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": e["input_ids"].tolist()}) + "\n" for e in token_data()))
    out = tmp_path / "out"
    config = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "sora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"format": "blocks", "train_file": str(data), "max_length": 16},
        "train": {"steps": 6, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2, "gate_lr": 0.1, "lambda_start": 2.0,
                  "seed": SEED, "log_every": 3, "output_dir": str(out)},
    }  # fmt: skip
    return config, out


@pytest.mark.parametrize("launcher", ["accelerate", "deepspeed"])
def test_cli_launchers_match_one_process(launcher, dist_model_dir, reference, tmp_path):
    """The user path, `python -m sora_dist.cli train run.yaml` (sora-train) on 2 CPU processes,
    trains the reference's adapter.

    run.yaml holds the worker's settings: SoRA r=4, alpha 8, no dropout; the worker's token data as
    data.format blocks of 16 tokens; 6 steps of micro-batch 2 x 2 accumulation, lr 1e-2, gate lr 0.1,
    λ = 2, the worker's seed.
    accelerate: `accelerate launch --config_file launch/cpu_2proc.yaml` (ZeRO-2 from the YAML);
    deepspeed: the `deepspeed` launcher, with `distributed.deepspeed_config: ds_configs/zero3.json`.
    """
    config, out = worker_run_config(tmp_path, dist_model_dir)
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", "launch/cpu_2proc.yaml", "--main_process_port", "0", "-m"]
    else:
        config["distributed"] = {"deepspeed_config": "ds_configs/zero3.json"}
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module"]
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(config))
    proc = run_command([*cmd, "sora_dist.cli", "train", str(run_yaml)])
    assert "live ranks" in proc.stdout
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert_close(adapter, reference.adapter, FP32_ATOL, f"{launcher} launcher CLI vs one process")


def per_step_calls(result: Result) -> list[list]:
    steps = result.facts[0]["collectives"]
    return [s["calls"] for s in steps[1:]]  # step 1 also holds DeepSpeed's setup traffic


def test_zero2_gate_update_adds_no_collective(dist_model_dir, tmp_path):
    """Count torch.distributed calls per optimizer step under ZeRO-2, SoRA vs LoRA (gates frozen at 1).

    - the gate update inside SoRAOptimizer.step() issues no collective at all;
    - gate gradients ride in the same gradient reductions (same number of calls, n_gates more
      elements per micro-batch);
    - the only extra calls are DeepSpeed's per-param-group bookkeeping for the gate group: one
      all_gather of the updated gate shards and one 1-element all_reduce of the group's gradient norm.
    """
    sora, lora = tmp_path / "sora", tmp_path / "lora"
    # A bucket the size real configs use; the "auto" one (hidden^2 = 1024 here) splits the toy model's gradients.
    common = ("--backend", "zero2", "--count-collectives", "--zero-option", "reduce_bucket_size=50000000")
    launch(sora, dist_model_dir, *common)
    launch(lora, dist_model_dir, *common, "--lora")
    sora, lora = Result(sora), Result(lora)
    n_gates = sum(g.numel() for g in sora.gates.values())
    for result in (sora, lora):
        assert all(s["in_optimizer_step"] == 0 for s in result.facts[0]["collectives"][1:])
    for sora_calls, lora_calls in zip(per_step_calls(sora), per_step_calls(lora), strict=True):
        reductions = [[n for op, n in calls if op in ("all_reduce", "reduce_scatter_tensor") and n > 1] for calls in (sora_calls, lora_calls)]
        assert len(reductions[0]) == len(reductions[1])
        assert sum(reductions[0]) - sum(reductions[1]) == n_gates * len(reductions[0])
        extra = collections.Counter(op for op, _ in sora_calls) - collections.Counter(op for op, _ in lora_calls)
        assert extra == collections.Counter({"all_reduce": 1, "all_gather_into_tensor": 1}), extra
        gathers = collections.Counter(n for op, n in sora_calls if op == "all_gather_into_tensor")
        gathers.subtract(n for op, n in lora_calls if op == "all_gather_into_tensor")
        assert +gathers == collections.Counter({n_gates + n_gates // 2: 1})  # output + this rank's input shard


def test_killed_offload_run_with_cpu_adam_resumes_to_rounding(dist_model_dir, tmp_path):
    """ZeRO-3 with optimizer offload steps DeepSpeed's CPU Adam. Killed while writing checkpoint 4 and
    resumed, it ends where the uninterrupted run ends up to fp32 rounding, not bit for bit: the C++
    Adam keeps its bias corrections beta^t as running products, which a resume recomputes as powers
    (measured: max |difference| ~1e-7; every other backend resumes bit-identically, above)."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    common = ("--backend", "zero3_offload", "--dropout", "0.1", "--save-every", "2")
    launch(straight, dist_model_dir, *common)
    assert launch(crashed, dist_model_dir, *common, "--crash-in-save", "4", expect_ok=False).returncode != 0
    resumed = launch(crashed, dist_model_dir, *common)
    assert "at step 2" in resumed.stdout, resumed.stdout[-2000:]
    assert_close(Result(crashed).adapter, Result(straight).adapter, 1e-5, "resumed CPU Adam run vs straight run")
    assert zero_pattern_mismatches(Result(crashed).gates, Result(straight).gates) == 0


def test_zero2_scale_moving_step_and_l1_term_match_one_process(dist_model_dir, tmp_path):
    """train.normalize_factors and train.gate_l1 on ZeRO-2 (each rank rescales its flat shard after
    one all-reduce of partial norms) equal the same training on one process; ΔW's rank rows come
    out at norm 1 where the gate lives."""
    options = ("--normalize-factors", "--gate-l1", "1.0", "--lambda", "0.01")
    launch(tmp_path / "one", dist_model_dir, "--backend", "single", "--micro-batch-size", "4", *options, nproc=1)
    launch(tmp_path / "two", dist_model_dir, "--backend", "zero2", *options)
    one, two = Result(tmp_path / "one"), Result(tmp_path / "two")
    assert_ranks_identical(two)
    assert_close(two.tensors[0], one.tensors[0], FP32_ATOL, "zero2 + normalize_factors + gate_l1 vs one process")
    assert zero_pattern_mismatches(two.gates, one.gates) == 0
    alive = 0
    for key, gate in one.gates.items():
        a = one.tensors[0][key.removesuffix("gate") + "lora_A"].norm(dim=1)
        live = (gate != 0) & (a > 0)
        alive += int(live.sum())
        torch.testing.assert_close(a[live], torch.ones_like(a[live]), atol=1e-5, rtol=0)
    assert alive > 0
