"""sora-merge and sora-export (sora_dist.deploy): merged folders and PEFT adapters that reproduce the
SoRA model; refusals (mismatched base, existing output), an interrupted merge leaving nothing, the
streaming merge's peak memory, and merging a 4-bit-trained adapter into the full-precision base."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import batch, logits, randomize_adapters, require_smollm2, save_tiny_model, tiny_llama, word_tokenizer

from sora_dist import SoRAConfig, inject_sora, load_sora, save_sora, sora_modules
from sora_dist.cli import export_main, merge_main, run
from sora_dist.deploy.io import read_adapter


def trained_adapter(model, folder: Path, dead: str | None = None, seed: int = 1) -> Path:
    """Inject, give the branches non-trivial weights and varied live ranks, save without pruning."""
    inject_sora(model, SoRAConfig(r=4, alpha=8, target_modules="all-linear"), verbose=False)
    randomize_adapters(model, seed=seed, b_std=0.2)
    with torch.no_grad():
        for i, (name, module) in enumerate(sora_modules(model)):
            module.gate[: i % 4] = 0.0  # live ranks 4, 3, 2, 1, 4, ...
            if name == dead:
                module.gate.zero_()
    save_sora(model, folder)
    return folder


def save_base(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def test_merged_folder_matches_sora_model_on_tiny_llama(tmp_path):
    from transformers import AutoModelForCausalLM

    base = save_base(tiny_llama(seed=3), tmp_path / "base", max_shard_size="40KB")
    assert len(list(base.glob("*.safetensors"))) > 1, "the base should be split into several shards"
    model = AutoModelForCausalLM.from_pretrained(base)
    dead = "model.layers.1.mlp.up_proj"
    adapter = trained_adapter(model, tmp_path / "adapter", dead=dead)
    assert run(merge_main, ["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(True for _ in sora_modules(merged))
    ids = batch(7, n=3, seq=16)
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), atol=1e-5, rtol=0)
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(merged.generate(ids[:1], **greedy), model.generate(ids[:1], **greedy))
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "merged" / name).is_file()


def test_peft_export_matches_sora_model(tmp_path):
    from peft import PeftModel

    model = tiny_llama(seed=4)
    dead = "model.layers.0.self_attn.v_proj"
    adapter = trained_adapter(model, tmp_path / "adapter", dead=dead)
    assert run(export_main, ["--adapter", str(adapter), "--out", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert dead not in config["target_modules"]
    assert len(set(config["rank_pattern"].values())) == 4, "modules should keep different live ranks"
    peft_model = PeftModel.from_pretrained(tiny_llama(seed=4), tmp_path / "peft")
    ids = batch(8, n=2, seq=16)
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), atol=1e-5, rtol=0)
    # PEFT's own view: the pruned module has no LoRA, the others have their live rank.
    lora_ranks = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default"): m.out_features
                  for n, m in peft_model.named_modules() if n.endswith("lora_A.default")}
    assert lora_ranks == config["rank_pattern"]


def test_peft_export_keeps_classifier_head(tmp_path):
    from peft import PeftModel

    model = tiny_llama(seed=5, cls_name="LlamaForSequenceClassification", num_labels=3)
    inject_sora(model, SoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["score"]), verbose=False)
    randomize_adapters(model, b_std=0.2)
    with torch.no_grad():
        model.score.weight.add_(0.5)
    save_sora(model, tmp_path / "adapter")
    export_main(["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "peft")])
    peft_model = PeftModel.from_pretrained(tiny_llama(seed=5, cls_name="LlamaForSequenceClassification", num_labels=3), tmp_path / "peft")
    ids = batch(9, n=2, seq=10)
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_mismatched_base_is_refused(tmp_path, capsys):
    base_small = save_base(tiny_llama(seed=0, hidden_size=32, intermediate_size=64), tmp_path / "small")
    adapter = trained_adapter(tiny_llama(seed=0), tmp_path / "adapter")
    code = run(merge_main, ["--base", str(base_small), "--adapter", str(adapter), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "base_model.hidden_size is 64 in the adapter but 32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path, capsys):
    base = save_base(tiny_llama(seed=0), tmp_path / "base")
    adapter = trained_adapter(tiny_llama(seed=0), tmp_path / "adapter")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["--base", str(base), "--adapter", str(adapter), "--out", str(out)]
    assert run(merge_main, args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    assert run(merge_main, args + ["--force"]) == 0
    assert (out / "config.json").is_file() and not (out / "precious.txt").exists()


def test_interrupted_merge_leaves_nothing_behind(tmp_path, monkeypatch):
    import sora_dist.deploy.stream_merge as merge_stream

    base = save_base(tiny_llama(seed=0), tmp_path / "base", max_shard_size="40KB")
    adapter = trained_adapter(tiny_llama(seed=0), tmp_path / "adapter")
    real_write, calls = merge_stream.write_safetensors, []

    def dies_on_second_shard(*args):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_write(*args)

    monkeypatch.setattr(merge_stream, "write_safetensors", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        merge_main(["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out")])
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"], "no output and no temporary folder"


RSS_RUNNER = """
import resource, sys
from sora_dist.cli import merge_main
import sora_dist.deploy.stream_merge, sora_dist.deploy.sources, sora_dist.deploy.export
sources = sora_dist.deploy.sources.resolve_adapter(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
merge_main(["--base", sys.argv[1], "--adapter", sys.argv[2], "--out", sys.argv[3]])
print("RSS", before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_streaming_merge_peak_memory_is_about_one_shard(tmp_path):
    """Peak RSS growth while merging stays below the largest shard + 64 MiB, far below the model.

    Measured in a fresh process: the high-water mark after imports and reading the adapter is the
    baseline; the growth past it is what the merge itself needed.
    """
    model = tiny_llama(seed=0, vocab_size=4096, hidden_size=768, intermediate_size=2048, num_hidden_layers=4,
                       num_attention_heads=12, num_key_value_heads=4)
    base = save_base(model, tmp_path / "base", max_shard_size="40MB")
    adapter = trained_adapter(model, tmp_path / "adapter")
    del model
    shards = sorted(base.glob("*.safetensors"))
    largest, total = max(p.stat().st_size for p in shards), sum(p.stat().st_size for p in shards)
    assert len(shards) >= 4
    out = subprocess.run([sys.executable, "-c", RSS_RUNNER, str(base), str(adapter), str(tmp_path / "merged")],
                         capture_output=True, text=True, check=True)
    before_kib, after_kib = map(int, out.stdout.split("RSS")[-1].split())
    growth = (after_kib - before_kib) * 1024
    assert growth < largest + 64 * 2**20, f"merge grew RSS by {growth / 2**20:.0f} MiB; largest shard {largest / 2**20:.0f} MiB"
    assert growth < total / 2, f"merge grew RSS by {growth / 2**20:.0f} MiB for a {total / 2**20:.0f} MiB model"


@pytest.mark.slow
def test_merged_real_model_matches_sora_model(tmp_path):
    """SmolLM2-135M: the merged folder against the SoRA model it came from.

    Storing W0 + ΔW in fp32 rounds each weight once (relative 6e-8); through 30 layers that alone
    moves logits of magnitude ~20 by 2-5e-5 (measured), in fp32 and even when both models are run
    in float64. So the merge itself is checked weight by weight against an independent float64
    computation (to 1e-6: the gate is folded into B in fp32 before the float64 sum), logits at
    atol 3e-4 (measured 0.4-1.2e-4 with these deliberately large adapters), greedy text exactly.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = require_smollm2()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base_weights = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k.endswith("proj.weight")}
    adapter = trained_adapter(model, tmp_path / "adapter", dead="model.layers.3.mlp.down_proj", seed=2)
    merge_main(["--base", str(path), "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    merged_weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for name, module in sora_modules(model):
        A, B, g = (t.detach().double() for t in (module.lora_A, module.lora_B, module.gate))
        expected = (base_weights[f"{name}.weight"].double() + module.scale * (B * g) @ A).float()
        torch.testing.assert_close(merged_weights[f"{name}.weight"], expected, atol=1e-6, rtol=0, msg=name)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = batch(3, n=2, seq=12, vocab=model.config.vocab_size)
    greedy = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(merged.generate(ids[:1], **greedy), model.generate(ids[:1], **greedy))
    torch.testing.assert_close(logits(merged, ids), logits(model, ids), atol=3e-4, rtol=0)


def test_adapter_trained_on_4bit_merges_into_full_precision_base(tmp_path, capsys):
    """The recommended path: a 4-bit-trained adapter merged into the fp32 base, with a probe report.

    The merged model equals base + ΔW exactly; it differs from the 4-bit model by the base's
    quantization error only, which the report prints.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tokenizer = word_tokenizer([f"w{i}" for i in range(128)], pad="w0", unk="w1", eos=None, pre_tokenizer=pre_tokenizers.Whitespace())
    base = save_tiny_model(tmp_path / "base", tiny_llama(seed=6), tokenizer)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    qmodel = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, device_map="cpu")
    adapter = trained_adapter(qmodel, tmp_path / "adapter")
    assert read_adapter(adapter)[0]["base_quantization"]["load_in_4bit"] is True
    assert run(merge_main, ["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    report = capsys.readouterr().out
    assert "merged model vs the 4-bit model the adapter was trained on" in report
    # Independent check of the merge itself: fp32 base + the adapter, no quantization anywhere.
    reference = load_sora(AutoModelForCausalLM.from_pretrained(base), adapter)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = batch(5)
    torch.testing.assert_close(logits(merged, ids), logits(reference, ids), atol=1e-5, rtol=0)


def test_quantize_reports_added_error(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base = save_base(tiny_llama(seed=7), tmp_path / "base")
    adapter = trained_adapter(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")
    code = run(merge_main, ["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "q"), "--quantize", "nf4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "requantization error" in out
    max_rel = float(out.split("max relative (Frobenius) = ")[1].split()[0].rstrip(";"))
    assert 0 < max_rel < 0.2  # nf4 on Gaussian-like weights: ~0.1 relative error
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in quantized.modules())


def test_a_run_folder_merges_without_naming_its_base(tiny_model_dir, tmp_path):
    """The base comes from the run's config.yaml (model.path); the result equals naming it."""
    from helpers import write_config
    from safetensors.torch import load_file

    from sora_dist.cli import train_main

    assert train_main([str(write_config(tmp_path, tiny_model_dir))]) == 0
    run_dir = tmp_path / "out"
    assert run(merge_main, ["--adapter", str(run_dir), "--out", str(tmp_path / "implicit")]) == 0
    assert run(merge_main, ["--base", str(tiny_model_dir), "--adapter", str(run_dir), "--out", str(tmp_path / "explicit")]) == 0
    implicit, explicit = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("implicit", "explicit"))
    assert implicit.keys() == explicit.keys() and all(torch.equal(implicit[k], explicit[k]) for k in implicit)
    lone = tmp_path / "lone"
    (lone / "adapter").mkdir(parents=True)
    for file in (run_dir / "adapter").iterdir():
        (lone / "adapter" / file.name).write_bytes(file.read_bytes())
    assert run(merge_main, ["--adapter", str(lone / "adapter"), "--out", str(tmp_path / "none")]) == 2
