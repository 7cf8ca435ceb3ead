"""prune_sora, merge_sora and save_sora/load_sora keep the model's function and every tensor.

Tolerances: on the tiny fp32 Llama, pruning and merging only change the order of float32 sums, so
logits (magnitude ~1) agree to atol 1e-5. On the real SmolLM2 (30 layers, logits of magnitude ~20)
fp32 rounding accumulates to ~5e-5, so there the tight check (atol 1e-5) runs in float64 and the
fp32 check uses atol 2e-4. Save/load is checked bit-exact (torch.equal).
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from helpers import batch, logits, randomize_adapters, require_smollm2, tiny_bert_classifier, tiny_llama, train_steps
from torch import nn

from sora_dist import (
    SoRAConfig,
    SoRALinear,
    SoRAOptimizer,
    inject_sora,
    load_sora,
    merge_sora,
    prune_sora,
    save_sora,
    sora_modules,
    sora_param_groups,
)

SEED = 7
R = 6
DEAD = "model.layers.0.self_attn.v_proj"  # every gate of this module is set to zero by hand


@pytest.fixture(scope="module")
def sparse_model():
    """A tiny Llama (fp32) with SoRA on every projection, trained 10 steps with lambda so that some
    gates are exactly zero; all gates of DEAD are zeroed by hand. Tests deep-copy it."""
    torch.manual_seed(0)
    model = inject_sora(tiny_llama(seed=SEED), SoRAConfig(r=R, alpha=12.0), verbose=False)
    opt = SoRAOptimizer(sora_param_groups(model, lr=1e-2, gate_lr=0.05, lambda_=0.9), lr=1e-2)
    train_steps(model, opt, steps=10)
    with torch.no_grad():
        model.get_submodule(DEAD).gate.zero_()
    model.eval()
    live = {n: int((m.gate != 0).sum()) for n, m in sora_modules(model)}
    assert any(0 < k < R for k in live.values()), f"need partially pruned modules, got {live}"
    return model


def _closed_form_weight(module: SoRALinear) -> torch.Tensor:
    """W0 + s * B diag(g) A in float64, from the module's tensors."""
    W0 = module.base.weight.detach().double()
    B, g, A = module.lora_B.detach().double(), module.gate.detach().double(), module.lora_A.detach().double()
    return W0 + module.scale * B @ torch.diag(g) @ A


# ----------------------------------------------------------------------------- prune


def test_prune_keeps_logits_shrinks_modules_and_removes_dead_ones(sparse_model):
    """prune_sora keeps exactly the live ranks (A[K], B[:, K], g[K], same scale), turns the all-dead
    module into its bare base Linear, and leaves the logits unchanged (fp32, atol 1e-5)."""
    ids = batch(1, n=3, seq=16)
    reference = logits(sparse_model, ids)
    base_only = logits(tiny_llama(seed=SEED), ids)
    assert (reference - base_only).abs().max() > 1e-3, "the adapter must change the model's output"

    model = copy.deepcopy(sparse_model)
    before = {n: (m.base, m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.gate.detach().clone(), m.scale) for n, m in sora_modules(model)}
    prune_sora(model)
    after = dict(sora_modules(model))
    for name, (base, A, B, g, scale) in before.items():
        keep = torch.nonzero(g != 0).flatten()
        if keep.numel() == 0:
            assert name not in after
            assert model.get_submodule(name) is base and type(base) is nn.Linear
            continue
        m = after[name]
        assert m.rank == keep.numel() and m.scale == scale and m.base is base
        assert torch.equal(m.lora_A.detach(), A[keep]) and torch.equal(m.lora_B.detach(), B[:, keep])
        assert torch.equal(m.gate.detach(), g[keep]) and bool((m.gate != 0).all())
        assert m.lora_A.requires_grad and m.gate.requires_grad
    assert DEAD not in after and len(after) == len(before) - sum(int((v[3] != 0).sum() == 0) for v in before.values())
    assert any(m.rank < R for m in after.values())
    torch.testing.assert_close(logits(model, ids), reference, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- merge


@pytest.mark.parametrize("pruned_first", [False, True])
def test_merge_matches_closed_form_and_keeps_logits(sparse_model, pruned_first):
    """merge_sora stores W0 + s B diag(g) A (float64 closed form, atol 1e-6) in plain Linears, reports
    zero error in fp32, and the merged model's logits equal the SoRA model's (atol 1e-5)."""
    ids = batch(2, n=3, seq=16)
    reference = logits(sparse_model, ids)
    model = copy.deepcopy(sparse_model)
    if pruned_first:
        prune_sora(model)
    expected = {n: _closed_form_weight(m) for n, m in sora_modules(model)}
    lm_head = model.lm_head.weight.detach().clone()

    report = merge_sora(model)

    assert not any(True for _ in sora_modules(model)) and not hasattr(model, "sora_config")
    assert [m.name for m in report.modules] == list(expected)
    for entry in report.modules:
        layer = model.get_submodule(entry.name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
        torch.testing.assert_close(layer.weight.detach().double(), expected[entry.name], atol=1e-6, rtol=0)
        assert entry.base_kind == "dense" and entry.out_dtype == "float32"
    assert report.max_abs_error == 0.0 and report.max_rel_error == 0.0
    assert torch.equal(model.lm_head.weight, lm_head)
    torch.testing.assert_close(logits(model, ids), reference, atol=1e-5, rtol=0)


def test_float64_merge_is_exact_in_float64(sparse_model):
    """A float64 model merges in float64: weights equal the float64 closed form to 1e-12 (not rounded
    through fp32, which would leave ~1e-9 errors) and logits match the SoRA model to 1e-10."""
    model = copy.deepcopy(sparse_model).double()
    ids = batch(2, n=2, seq=8)
    reference = logits(model, ids)
    exact = {n: _closed_form_weight(m) for n, m in sora_modules(model)}
    report = merge_sora(model)
    for name, w in exact.items():
        layer = model.get_submodule(name)
        assert layer.weight.dtype == torch.float64
        torch.testing.assert_close(layer.weight.detach(), w, atol=1e-12, rtol=0)
    assert report.max_abs_error < 1e-12 and {m.out_dtype for m in report.modules} == {"float64"}
    torch.testing.assert_close(logits(model, ids), reference, atol=1e-10, rtol=0)


def test_merge_to_bf16_reports_the_rounding_error(sparse_model):
    """merge_sora(dtype=bf16) stores bf16 weights; the report's error is the measured bf16 rounding of
    the fp32 merged weight, > 0 and at most the bf16 unit roundoff (2^-8) times the largest weight."""
    model = copy.deepcopy(sparse_model)
    exact = {n: _closed_form_weight(m) for n, m in sora_modules(model)}
    report = merge_sora(model, dtype=torch.bfloat16)
    measured = 0.0
    for name, w in exact.items():
        layer = model.get_submodule(name)
        assert layer.weight.dtype == torch.bfloat16
        err = (layer.weight.detach().double() - w).abs().max().item()
        measured = max(measured, err)
        assert err <= w.abs().max().item() * 2**-8  # unit roundoff of bf16 (8-bit significand)
    assert report.max_abs_error > 0
    assert report.max_abs_error == pytest.approx(measured, rel=1e-3, abs=1e-7)
    assert {m.out_dtype for m in report.modules} == {"bfloat16"}
    assert "merged" in report.summary()


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_pruned_and_merged_match_sora_model_and_greedy_generation():
    """On SmolLM2-135M-Instruct with a sparse SoRA adapter on every projection: pruned and merged
    models give the SoRA model's logits. fp32 rounding through 30 layers gives ~5e-5 differences on
    logits of magnitude ~20, so the tight comparison runs in float64 (atol 1e-5) and the fp32 one at
    atol 2e-4. Greedy generation of 6 tokens is identical between the SoRA and the merged model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = require_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    inject_sora(model, SoRAConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]), verbose=False)
    randomize_adapters(model, seed=3, b_std=0.02)
    with torch.no_grad():
        for i, (_name, m) in enumerate(sora_modules(model)):
            m.gate[m.gate.abs() < 0.5] = 0.0
            if i == 5:
                m.gate.zero_()
    dead = [n for n, m in sora_modules(model) if not (m.gate != 0).any()]
    assert dead

    enc = tokenizer(["The capital of France is", "Low-rank adapters are"], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]

    def run(m):
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask).logits

    # fp32: merged vs SoRA logits and greedy generation
    reference32 = run(model)
    merged = copy.deepcopy(model)
    merge_sora(merged)
    torch.testing.assert_close(run(merged), reference32, atol=2e-4, rtol=0, msg="merged vs SoRA in fp32")
    gen = dict(input_ids=ids[:1, : int(mask[0].sum())], max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        assert torch.equal(model.generate(**gen), merged.generate(**gen))
    del merged

    # float64: merged and pruned vs SoRA logits at atol 1e-5
    model.double()
    reference64 = run(model)
    merged = copy.deepcopy(model)
    merge_sora(merged)
    torch.testing.assert_close(run(merged), reference64, atol=1e-5, rtol=0, msg="merged vs SoRA in float64")
    del merged
    prune_sora(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in dead)
    torch.testing.assert_close(run(model), reference64, atol=1e-5, rtol=0, msg="pruned vs SoRA in float64")
    model.float()
    torch.testing.assert_close(run(model), reference32, atol=2e-4, rtol=0, msg="pruned vs SoRA in fp32")


# ----------------------------------------------------------------------------- save / load


def _adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_adapter(a, b):
    ta, tb = _adapter_tensors(a), _adapter_tensors(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    sa, sb = dict(sora_modules(a)), dict(sora_modules(b))
    assert set(sa) == set(sb)
    for name in sa:
        assert sa[name].scale == sb[name].scale and sa[name].rank == sb[name].rank


@pytest.mark.parametrize("pruned", [False, True])
def test_save_load_round_trip_is_bit_exact(sparse_model, tmp_path, pruned):
    """save_sora then load_sora into a fresh base reproduces every adapter tensor bit for bit (also after
    prune_sora, where ranks differ per module and one module has none) and the logits exactly."""
    model = copy.deepcopy(sparse_model)
    if pruned:
        prune_sora(model)
    path = tmp_path / "adapter"
    save_sora(tiny_llama_adapter_decoy(), path)  # an older adapter in the same folder gets replaced
    save_sora(model, path, extra={"note": "test"})
    meta = json.loads((path / "sora_config.json").read_text())
    assert meta["note"] == "test" and set(meta["modules"]) == {n for n, _ in sora_modules(model)}

    fresh = load_sora(tiny_llama(seed=SEED), path)
    _assert_same_adapter(model, fresh)
    if pruned:
        assert type(fresh.get_submodule(DEAD)) is nn.Linear
        assert len({m.rank for _, m in sora_modules(fresh)}) > 1
    ids = batch(3)
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def tiny_llama_adapter_decoy():
    return inject_sora(tiny_llama(seed=SEED), SoRAConfig(r=2, target_modules=["q_proj"]), verbose=False)


@pytest.mark.parametrize("kind", ["llama_seqcls", "bert_seqcls"])
def test_modules_to_save_round_trip(tmp_path, kind):
    """A classifier head kept by modules_to_save (weight, and bias for BERT) is saved and restored
    bit-exactly together with the adapters; the classifier logits are identical."""
    def make():
        if kind == "llama_seqcls":
            return tiny_llama(seed=11, cls_name="LlamaForSequenceClassification", num_labels=3), "score"
        return tiny_bert_classifier(seed=11), "classifier"

    model, head = make()
    inject_sora(model, SoRAConfig(r=3, modules_to_save=[head]), verbose=False)
    randomize_adapters(model, seed=4)
    with torch.no_grad():
        for p in model.get_submodule(head).parameters():
            p.add_(torch.randn_like(p))
            assert p.requires_grad
    save_sora(model, tmp_path / "cls")
    meta = json.loads((tmp_path / "cls" / "sora_config.json").read_text())
    assert meta["trainable"] == sorted(n for n, _ in model.get_submodule(head).named_parameters(prefix=head))

    fresh, _ = make()
    load_sora(fresh, tmp_path / "cls")
    _assert_same_adapter(model, fresh)
    model.eval(), fresh.eval()
    ids = batch(5)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_into_a_different_base_fails_naming_the_key(sparse_model, tmp_path):
    """Loading into a model with another hidden size or model_type raises ValueError naming the key;
    a missing folder raises FileNotFoundError naming the path."""
    from transformers import MistralConfig, MistralForCausalLM

    path = save_sora(sparse_model, tmp_path / "a")
    with pytest.raises(ValueError, match="hidden_size"):
        load_sora(tiny_llama(seed=SEED, hidden_size=32), path)
    cfg = tiny_llama(seed=SEED).config
    mistral = MistralForCausalLM(MistralConfig(**{k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}))
    with pytest.raises(ValueError, match="model_type"):
        load_sora(mistral, path)
    missing = tmp_path / "no_such_adapter"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_sora(tiny_llama(seed=SEED), missing)
    with pytest.raises(ValueError, match="no SoRA adapter"):
        save_sora(tiny_llama(), tmp_path / "b")
