"""The chunked causal-LM loss (sora_dist/training/chunked_loss.py) against the plain one computed from
full logits in this file: per-row losses and every gradient, for untied and tied output embeddings,
a softcapped model (Gemma 2), padding, packed rows, chunk sizes that do and do not divide the
labelled tokens, and the training loop with accumulation over variable-length rows."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama

from sora_dist import SoRAConfig, inject_sora
from sora_dist.data.formats import IGNORE
from sora_dist.training.chunked_loss import chunked_output, output_layer, row_token_losses


def reference_row_losses(model, batch) -> torch.Tensor:
    """Per-row sums of next-token cross-entropy from the model's own full logits (softcap included)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none")
    return losses.view(labels.shape).sum(-1)


def gemma2(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    return transformers.Gemma2ForCausalLM(config).float()


MODELS = {
    "llama_untied": lambda: tiny_llama(seed=0),
    "llama_tied": lambda: tiny_llama(seed=0, tie_word_embeddings=True),
    "gemma2_softcap_tied": gemma2,
}


def sora_model(name: str):
    model = MODELS[name]()
    torch.manual_seed(3)
    inject_sora(model, SoRAConfig(r=4, alpha=8, dropout=0.0), verbose=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    return model


def random_batch(seed: int, rows: int = 3, length: int = 14, packed: bool = False) -> dict:
    """Rows of random tokens, right-padded to different lengths, labels on a random subset of the
    real tokens (prompt tokens and padding are IGNORE); ``packed``: two examples per row with
    position_ids restarting at the second."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    labels = ids.clone()
    for r in range(rows):
        real = length - int(torch.randint(0, 5, (1,), generator=g))
        ids[r, real:], mask[r, real:], labels[r, real:] = 0, 0, IGNORE
        prompt = int(torch.randint(1, 6, (1,), generator=g))
        labels[r, :prompt] = IGNORE
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if packed:
        half = length // 2
        batch["position_ids"] = torch.cat([torch.arange(half), torch.arange(length - half)]).repeat(rows, 1)
        del batch["attention_mask"]
        batch["labels"][:, half] = IGNORE  # the first token of the second example has no prediction target
    return batch


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("chunk", "packed", "seed"), [(1, False, 0), (5, False, 1), (7, True, 2), (None, False, 3)])
def test_chunked_losses_and_gradients_equal_the_full_logits(name, chunk, packed, seed):
    model = sora_model(name)
    assert output_layer(model) is not None
    batch = random_batch(seed, packed=packed)
    trainable = [p for p in model.parameters() if p.requires_grad]

    want = reference_row_losses(model, batch)
    want_grads = torch.autograd.grad((want * torch.tensor([1.0, 0.5, 2.0])).sum(), trainable)
    got = row_token_losses(model, batch, chunk, plain=None)
    got_grads = torch.autograd.grad((got * torch.tensor([1.0, 0.5, 2.0])).sum(), trainable)

    assert got.shape == want.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)  # gemma2: up to 1.5e-6 from the softcap derivative
    # The model is left as it was: its output layer and its softcap are back.
    assert "forward" not in vars(model.get_output_embeddings())
    if name.startswith("gemma2"):
        assert model.config.final_logit_softcapping == 30.0


def test_no_tensor_of_the_vocabulary_size_per_token_is_kept_for_backward():
    """What autograd keeps from the loss: the gradient with respect to the labelled hidden states, never
    anything of (tokens x vocabulary) size."""
    model = sora_model("llama_untied")
    batch = random_batch(5, rows=2, length=40)
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    kept: list[torch.Size] = []

    def pack(tensor):
        kept.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with chunked_output(model, batch["labels"], 8) as active:
            assert active
            model.model.layers.requires_grad_(False)  # only what the loss itself keeps is counted below
            hidden = torch.randn(2, 40, 64, requires_grad=True)
            model.get_output_embeddings()(hidden)
    assert kept and all(shape.numel() <= labelled * 64 for shape in kept), kept


def test_a_trained_or_absent_output_layer_uses_the_plain_loss():
    model = sora_model("llama_untied")
    model.get_output_embeddings().weight.requires_grad_(True)
    batch = random_batch(0)
    plain_calls = []

    def plain(logits, labels):
        plain_calls.append(logits.shape)
        return reference_row_losses(model, batch)

    row_token_losses(model, batch, 16, plain)
    assert plain_calls == [torch.Size([3, 14, 128])]


def test_training_with_accumulation_and_variable_lengths_equals_the_plain_loss(tmp_path):
    """Three optimizer steps of 2 accumulated micro-batches of padded variable-length rows: the adapter
    trained with the chunked loss equals the one trained from full logits."""
    from dist_worker import variable_data

    from sora_dist.backends.accelerate import build_accelerator
    from sora_dist.data.collate import pad_collate
    from sora_dist.deploy.io import adapter_state
    from sora_dist.training.config import TrainConfig
    from sora_dist.training.loop import train

    results = []
    for chunk in (0, 6):
        accelerator = build_accelerator(None, "no", 2)
        model = sora_model("llama_untied")
        config = TrainConfig(steps=3, micro_batch_size=3, grad_accum=2, lr=1e-2, gate_lr=0.1, lambda_start=0.5, log_every=0, seed=1,
                             loss_chunk_tokens=chunk)  # fmt: skip
        train(model, variable_data(n=24, vocab=128), config, accelerator, collate_fn=functools.partial(pad_collate, pad_id=0))
        results.append(adapter_state(model))
        accelerator.free_memory()
    plain, chunked = results
    for key, value in plain.items():
        torch.testing.assert_close(chunked[key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.distributed
def test_two_zero2_ranks_with_the_chunked_loss_equal_one_process_with_full_logits(dist_model_dir, tmp_path):
    """DeepSpeed ZeRO-2 on 2 processes, variable-length rows with accumulation, chunked loss (8 tokens per
    chunk) against one process computing the loss from full logits."""
    from helpers import FP32_ATOL, Result, launch
    from test_training_distributed import assert_close, zero_pattern_mismatches

    launch(tmp_path / "one", dist_model_dir, "--backend", "single", "--micro-batch-size", "4", "--variable-lengths", "--loss-chunk-tokens", "0",
           nproc=1)  # fmt: skip
    launch(tmp_path / "two", dist_model_dir, "--backend", "zero2", "--variable-lengths", "--loss-chunk-tokens", "8")
    one, two = Result(tmp_path / "one"), Result(tmp_path / "two")
    assert_close(two.tensors[0], one.tensors[0], FP32_ATOL, "zero2 chunked vs one process plain")
    assert zero_pattern_mismatches(two.gates, one.gates) == 0


def test_default_chunk_is_sized_from_the_vocabulary():
    from sora_dist.training.chunked_loss import CHUNK_LOGITS, chunk_size

    assert chunk_size(None, 49152) == CHUNK_LOGITS // 49152 == 341
    assert chunk_size(None, 262144) == 64
    assert chunk_size(None, 128) == 8192 and chunk_size(None, 10**9) == 32
    assert chunk_size(100, 262144) == 100
