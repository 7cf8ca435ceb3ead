"""Test setup shared by every test module: offline Hugging Face, CPU DeepSpeed, seeds, threads."""

import os

# Before anything imports transformers / deepspeed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from many threads and the machines here have 2 cores shared with other
# jobs; SORA_TEST_THREADS overrides.
_threads = int(os.environ.get("SORA_TEST_THREADS", "0")) or max(1, min(2, os.cpu_count() or 1))
torch.set_num_threads(_threads)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)
    yield
