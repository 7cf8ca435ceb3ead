"""The backend-independent pieces of the training loop, checked in one process (no launch needed):
sharded data order (sora_dist.training.batches), the lr schedule (training.lr), the DeepSpeed config
filled from the training settings and the shipped ds_configs (backends.accelerate), and the
token blocks of data.format blocks."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from sora_dist.backends import accelerate as engine
from sora_dist.data import read_token_blocks
from sora_dist.training.batches import ShardedBatches
from sora_dist.training.config import TrainConfig
from sora_dist.training.lr import lr_factor


def examples(n: int) -> list[dict]:
    return [{"input_ids": torch.tensor([i, i])} for i in range(n)]


def test_two_ranks_see_the_examples_of_one_process_with_twice_the_micro_batch():
    """Same global batch, any split: every optimizer step uses the same examples (over 3 epochs)."""
    data = examples(10)
    one = ShardedBatches(data, micro_batch_size=4, grad_accum=2, rank=0, world_size=1, seed=3)
    ranks = [ShardedBatches(data, micro_batch_size=2, grad_accum=2, rank=r, world_size=2, seed=3) for r in (0, 1)]
    for step in range(4):
        for micro in range(2):
            joined = torch.cat([r(step, micro)["input_ids"] for r in ranks])
            assert torch.equal(joined, one(step, micro)["input_ids"])


def test_each_epoch_is_a_fresh_permutation_of_all_examples():
    batches = ShardedBatches(examples(6), micro_batch_size=3, grad_accum=1, rank=0, world_size=1, seed=0)
    epochs = [torch.cat([batches(s, 0)["input_ids"][:, 0] for s in (2 * e, 2 * e + 1)]) for e in range(3)]
    assert all(sorted(e.tolist()) == list(range(6)) for e in epochs)
    assert not all(torch.equal(epochs[0], e) for e in epochs[1:])


def test_causal_lm_batches_predict_their_inputs():
    batch = ShardedBatches(examples(4), 2, 1, 0, 1, 0)(0, 0)
    assert torch.equal(batch["labels"], batch["input_ids"])


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
def test_learning_rate_warms_up_without_a_zero_step_then_decays(decay):
    config = TrainConfig(steps=10, warmup_steps=4, lr_decay=decay)
    factors = [lr_factor(s, config) for s in range(10)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    expected_last = {"linear": 1 / 6, "cosine": 0.5 * (1 + math.cos(math.pi * 5 / 6)), "constant": 1.0}[decay]
    assert factors[-1] == pytest.approx(expected_last)
    assert all(f > 0 for f in factors)


def fake_deepspeed_accelerator(config: dict, grad_accum: int = 2, processes: int = 2):
    plugin = SimpleNamespace(deepspeed_config=config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), gradient_accumulation_steps=grad_accum, num_processes=processes)


def test_deepspeed_auto_fields_take_the_training_settings():
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    engine.fill_deepspeed_config(fake_deepspeed_accelerator(config), micro_batch_size=4, max_grad_norm=0.5)
    assert config == {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5,
        "train_batch_size": 16,
    }


def test_a_deepspeed_value_that_contradicts_the_training_settings_is_an_error():
    config = {"gradient_accumulation_steps": 8}
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps is 8 but the training settings give 2.*\"auto\""):
        engine.fill_deepspeed_config(fake_deepspeed_accelerator(config), micro_batch_size=4, max_grad_norm=1.0)


def test_client_optimizer_is_found_under_wrappers():
    from sora_dist.core.optim import SoRAOptimizer

    sora = SoRAOptimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}])
    wrapped = SimpleNamespace(optimizer=SimpleNamespace(optimizer=sora))
    assert engine.client_optimizer(wrapped) is sora


def test_ds_config_errors_name_the_file(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(ValueError, match=r"ds\.json:2: invalid JSON"):
        engine.load_ds_config(bad)
    with pytest.raises(FileNotFoundError, match="ds_configs"):
        engine.load_ds_config(tmp_path / "missing.json")


def test_every_shipped_deepspeed_config_is_ready_for_the_sora_optimizer():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json")):
        config = json.loads(path.read_text())
        assert config["zero_allow_untested_optimizer"] is True, path.name
        assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto", path.name
        zero = config["zero_optimization"]
        if zero["stage"] == 3:
            assert zero["stage3_gather_16bit_weights_on_model_save"] is True, path.name
        if "offload_optimizer" in zero:
            assert config["zero_force_ds_cpu_optimizer"] is False, path.name


def test_token_blocks_cut_the_stream_and_name_bad_lines(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n\n{"input_ids": [4, 5, 6, 7]}\n')
    blocks = read_token_blocks(data, seq_len=3)
    assert [b["input_ids"].tolist() for b in blocks] == [[1, 2, 3], [4, 5, 6]]
    data.write_text('{"input_ids": [1]}\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: .*input_ids"):
        read_token_blocks(data, seq_len=1)


def test_length_grouped_batches_cover_every_example_once_and_group_similar_lengths():
    lengths = [(7 * i) % 53 + 1 for i in range(96)]
    data = [{"input_ids": torch.zeros(n)} for n in lengths]
    grouped = ShardedBatches(data, micro_batch_size=4, grad_accum=1, rank=0, world_size=1, seed=5, collate_fn=list, lengths=lengths)
    plain = ShardedBatches(data, micro_batch_size=4, grad_accum=1, rank=0, world_size=1, seed=5, collate_fn=list)
    epoch = [grouped._index(p) for p in range(len(data))]
    assert sorted(epoch) == list(range(len(data)))
    assert epoch == [grouped._index(p) for p in range(len(data))], "the order is fixed by the seed"

    def padding(batches) -> int:
        spans = [[lengths[batches._index(p)] for p in range(s, s + 4)] for s in range(0, len(data), 4)]
        return sum(4 * max(span) - sum(span) for span in spans)

    assert padding(grouped) < padding(plain) / 2


def test_evaluation_shards_give_every_example_once_and_every_rank_the_same_number_of_batches():
    from sora_dist.training.evaluate import shard_batches

    examples = [{"id": i} for i in range(11)]
    for world in (1, 2, 3, 4):
        shards = [list(shard_batches(examples, 2, rank, world)) for rank in range(world)]
        assert len({len(batches) for batches in shards}) == 1
        seen = [e["id"] for batches in shards for chunk, weights in batches for e, w in zip(chunk, weights) if w > 0]
        assert sorted(seen) == list(range(11))
