"""Packing (sora_dist.data.packing): every example lands in exactly one row that it fits, and a packed
batch gives the same loss and the same gradients as the same examples unpacked and padded (fp32);
sora-train packs when data.packing is on."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from helpers import WORDS, randomize_adapters, tiny_llama, write_config

from sora_dist import SoRAConfig, inject_sora
from sora_dist.cli import run, train_main
from sora_dist.data.collate import pad_collate
from sora_dist.data.packing import PackedExamples, collate_packed, pack_lengths
from sora_dist.training.loop import summed_token_loss


@pytest.mark.parametrize("capacity", [16, 40, 64])
def test_every_example_is_placed_once_in_a_row_it_fits(capacity):
    rng = random.Random(capacity)
    lengths = [rng.randint(1, capacity) for _ in range(300)]
    rows = pack_lengths(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    lower_bound = -(-sum(lengths) // capacity)
    assert lower_bound <= len(rows) <= 1.25 * lower_bound + 1  # first-fit decreasing is within 11/9 of the optimum
    with pytest.raises(ValueError, match="more than the packed row length"):
        pack_lengths([capacity + 1], capacity)


class Rows:
    """The minimal split PackedExamples needs: indexable rows with their lengths."""

    def __init__(self, rows):
        self.rows, self.lengths = rows, [len(r["input_ids"]) for r in rows]

    def __getitem__(self, i):
        return self.rows[i]

    def __len__(self):
        return len(self.rows)


def variable_rows(n: int = 10, seed: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=g))
        ids = torch.randint(1, 128, (length,), generator=g).tolist()
        labels = [-100 if int(torch.rand(1, generator=g)) > 0.7 else t for t in ids]  # some prompt tokens unlabelled
        labels[1] = ids[1]  # at least one label per example
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return rows


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = summed_token_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_packed_batch_has_the_loss_and_gradients_of_the_unpacked_examples():
    model = tiny_llama(seed=0)
    inject_sora(model, SoRAConfig(r=4, alpha=8), verbose=False)
    randomize_adapters(model)
    rows = variable_rows()
    packed = PackedExamples(Rows(rows), capacity=48)
    assert len(packed) < len(rows), "the test needs rows holding several examples"
    unpacked_loss, unpacked = loss_and_grads(model, pad_collate(rows, pad_id=0))
    packed_loss, packed_grads = loss_and_grads(model, collate_packed([packed[i] for i in range(len(packed))], pad_id=0))
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=0)
    for name, grad in unpacked.items():
        error = float((packed_grads[name] - grad).norm() / grad.norm())
        assert error <= 1e-5, f"{name}: relative difference {error:.2e}"


def test_collate_packed_restarts_positions_and_masks_example_starts():
    rows = [{"pack": [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]},
            {"pack": [{"input_ids": [4], "labels": [4]}]}]  # fmt: skip
    batch = collate_packed(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, -100, -100, -100, -100]]


def test_sora_train_packs_when_asked(tiny_model_dir, tmp_path):
    data = tmp_path / "text.jsonl"
    g = torch.Generator().manual_seed(0)
    with open(data, "w") as out:
        for _ in range(40):
            n = int(torch.randint(2, 12, (1,), generator=g))
            out.write(json.dumps({"text": " ".join(WORDS[int(i)] for i in torch.randint(0, 100, (n,), generator=g))}) + "\n")
    path = write_config(tmp_path, tiny_model_dir, steps=3, micro_batch_size=2)
    raw = yaml.safe_load(path.read_text())
    raw["data"] = {"format": "text", "train_file": str(data), "max_length": 32, "packing": True, "cache": False}
    path.write_text(yaml.safe_dump(raw))
    assert run(train_main, [str(path)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["train_examples"] == 40 and summary["packed_rows"] < 40


def test_example_by_example_attention_equals_the_masked_one():
    """sora_varlen (SDPA on each packed example, and on the unpadded part of each padded row) gives
    the loss and gradients of transformers' SDPA with its masks, and the same greedy generation."""
    from sora_dist.backends.varlen import use_varlen_attention

    model = tiny_llama(seed=0)
    inject_sora(model, SoRAConfig(r=4, alpha=8), verbose=False)
    randomize_adapters(model)
    rows = variable_rows()
    padded = pad_collate(rows, pad_id=0)
    packed = PackedExamples(Rows(rows), capacity=48)
    want_loss, want = loss_and_grads(model, padded)
    prompt = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 3, 4, 5]])
    mask = (prompt != 0).long()
    want_tokens = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert use_varlen_attention(model) and model.config._attn_implementation == "sora_varlen"
    for batch in (padded, collate_packed([packed[i] for i in range(len(packed))], pad_id=0)):
        loss, grads = loss_and_grads(model, batch)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
        for name, grad in want.items():
            assert float((grads[name] - grad).norm() / grad.norm()) <= 1e-5, name
    got_tokens = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got_tokens, want_tokens)
