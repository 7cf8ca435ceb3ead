"""Test setup shared by every test module: offline Hugging Face, CPU DeepSpeed, seeds, threads, and
the two tiny model folders (model + word-level tokenizer) that several modules train or merge."""

import os

# Before anything imports transformers / deepspeed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenized data sets are cached per test session, never in the user's cache (subprocesses inherit it).
os.environ.setdefault("SORA_DIST_DATA_CACHE", __import__("tempfile").mkdtemp(prefix="sora-test-data-"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import save_tiny_model, tiny_llama  # noqa: E402

# Tiny models gain nothing from many threads and the machines here have 2 cores shared with other
# jobs; SORA_TEST_THREADS overrides.
_threads = int(os.environ.get("SORA_TEST_THREADS", "0")) or max(1, min(2, os.cpu_count() or 1))
torch.set_num_threads(_threads)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """``helpers.tiny_llama(seed=0)`` (hidden 64, pad id 0) with ``word_tokenizer(WORDS)``, saved as a
    transformers folder: the model of the sora-train tests (write_config, staged_config)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"), tiny_llama(seed=0))


@pytest.fixture(scope="session")
def dist_model_dir(tmp_path_factory) -> Path:
    """The distributed tests' 2-layer Llama (hidden 32, intermediate 64, vocab 128, 4 heads / 2 kv
    heads, no pad id, seed 0) with ``word_tokenizer(WORDS)``, saved as safetensors so that ZeRO-3 can
    load it partitioned. FP32_ATOL and the bf16 tolerances were measured on exactly this model."""
    model = tiny_llama(seed=0, hidden_size=32, intermediate_size=64, pad_token_id=None)
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), model)
