"""Conv1D bases (transformers GPT-2 family, weight stored in x out) work like nn.Linear bases:
SoRA injects, trains, prunes, merges (in memory and into the base's files) and exports to PEFT,
each checked against a plain-PyTorch computation or the unmerged model."""

from __future__ import annotations

import pytest
import torch

from sora_dist import SoRAConfig, SoRAOptimizer, inject_sora, merge_sora, prune_sora, save_sora, sora_modules, sora_param_groups
from sora_dist.backends.linear import declared_features, dense_weight, is_conv1d
from sora_dist.cli import export_main, merge_main, run

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).float().eval()


def ids(seed: int, n: int = 2, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, 96, (n, seq), generator=torch.Generator().manual_seed(seed))


def trained_gpt2(steps: int = 3):
    """GPT-2 with SoRA on every Conv1D, trained ``steps`` steps with λ large enough to zero some gates."""
    model = tiny_gpt2()
    inject_sora(model, SoRAConfig(r=4, alpha=8, target_modules=GPT2_TARGETS), verbose=False)
    optimizer = SoRAOptimizer(sora_param_groups(model, lr=1e-2, gate_lr=0.3, lambda_=2.0))
    model.train()
    for step in range(steps):
        batch = ids(100 + step)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_conv1d_is_wrapped_with_its_declared_shape():
    model = tiny_gpt2()
    c_attn = model.transformer.h[0].attn.c_attn
    assert is_conv1d(c_attn) and declared_features(c_attn) == (32, 96)
    assert torch.equal(dense_weight(c_attn), c_attn.weight.detach().t())
    inject_sora(model, SoRAConfig(r=4, target_modules=GPT2_TARGETS), verbose=False)
    wrapped = dict(sora_modules(model))
    assert len(wrapped) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 layers
    assert (wrapped["transformer.h.0.attn.c_attn"].in_features, wrapped["transformer.h.0.attn.c_attn"].out_features) == (32, 96)


def test_all_linear_selects_the_conv1d_layers_and_not_the_head():
    model = tiny_gpt2()
    inject_sora(model, SoRAConfig(r=2), verbose=False)
    names = {name.rsplit(".", 1)[-1] for name, _ in sora_modules(model)}
    assert names == {"c_attn", "c_proj", "c_fc"}


@torch.no_grad()
def test_conv1d_forward_matches_a_plain_pytorch_reference():
    model = tiny_gpt2()
    inject_sora(model, SoRAConfig(r=3, alpha=6, target_modules=GPT2_TARGETS), verbose=False)
    module = model.transformer.h[1].mlp.c_fc
    module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    W, b = module.base.weight, module.base.bias  # W is in x out
    want = x @ W + b + 2.0 * ((x @ module.lora_A.t()) * module.gate) @ module.lora_B.t()
    torch.testing.assert_close(module(x), want, rtol=0, atol=1e-5)


def test_train_prune_merge_keep_the_logits():
    model = trained_gpt2()
    zeros = sum(int((m.gate == 0).sum()) for _, m in sora_modules(model))
    assert 0 < zeros < sum(m.rank for _, m in sora_modules(model)), "the test needs some dead and some live ranks"
    batch = ids(7)
    with torch.no_grad():
        before = model(input_ids=batch).logits
        prune_sora(model)
        pruned = model(input_ids=batch).logits
        merge_sora(model)
        merged = model(input_ids=batch).logits
    assert not any(True for _ in sora_modules(model))
    torch.testing.assert_close(pruned, before, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, before, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sora_merge_and_peft_export_of_a_gpt2_adapter(tmp_path):
    """The file paths: sora-merge into the GPT-2 base's safetensors (Conv1D weights in x out) and
    sora-export to PEFT (fan_in_fan_out) give the logits of the unmerged model."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base = tmp_path / "base"
    tiny_gpt2().save_pretrained(base)
    model = trained_gpt2()
    save_sora(model, tmp_path / "adapter")
    batch = ids(9)
    with torch.no_grad():
        want = model(input_ids=batch).logits
    assert run(merge_main, ["--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert run(export_main, ["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "peft")]) == 0
    exported = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base).eval(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=batch).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(exported(input_ids=batch).logits, want, rtol=0, atol=1e-5)
