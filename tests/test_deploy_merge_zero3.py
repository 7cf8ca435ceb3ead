"""sora-merge (sora_dist.deploy) from what distributed training leaves on disk: a DeepSpeed ZeRO-3
sharded checkpoint of 2 processes merges to the model a one-process checkpoint merges to."""

from __future__ import annotations

import pytest
import torch
from helpers import FP32_ATOL, launch
from safetensors.torch import load_file

from sora_dist.cli import merge_main
from sora_dist.deploy.sources import resolve_adapter

pytestmark = pytest.mark.distributed


def merged_weights(base, adapter, out) -> dict[str, torch.Tensor]:
    assert merge_main(["--base", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    return load_file(str(out / "model.safetensors"))


def test_merge_from_zero3_checkpoint_equals_single_process(dist_model_dir, tmp_path):
    """A 2-process ZeRO-3 run's step-4 checkpoint (adapter consolidated from the fp32 optimizer
    shards, frozen weights never assembled) merges to the same model as a 1-process run's step-4
    checkpoint of the same data and seed."""
    zero3, single = tmp_path / "zero3", tmp_path / "single"
    launch(zero3, dist_model_dir, "--backend", "zero3", "--save-every", "2")
    launch(single, dist_model_dir, "--backend", "single", "--micro-batch-size", "4", "--save-every", "2", nproc=1)
    zero3_ckpt = zero3 / "train" / "checkpoints" / "step-00000004"
    single_ckpt = single / "train" / "checkpoints" / "step-00000004"
    assert list(zero3_ckpt.rglob("zero_pp_rank_*optim_states.pt")), "expected a DeepSpeed sharded checkpoint"

    meta, tensors, where = resolve_adapter(zero3_ckpt)
    _, reference, _ = resolve_adapter(single_ckpt)
    assert "training checkpoint" in where
    assert sorted(tensors) == sorted(reference)
    for key, value in reference.items():
        assert tensors[key].shape == value.shape and tensors[key].numel() > 0, key
        assert (tensors[key].float() - value.float()).abs().max() <= FP32_ATOL, key
    # The run folder itself resolves to its final adapter.
    assert resolve_adapter(zero3 / "train")[2].endswith("adapter")

    got = merged_weights(dist_model_dir, zero3_ckpt, tmp_path / "merged_zero3")
    want = merged_weights(dist_model_dir, single_ckpt, tmp_path / "merged_single")
    base = load_file(str(dist_model_dir / "model.safetensors"))
    assert sorted(got) == sorted(want)
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert len(changed) == len(meta["modules"]), "every adapted weight should differ from the base"
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=FP32_ATOL, rtol=0, msg=key)
