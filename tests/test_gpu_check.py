"""benchmarks/gpu_check.py in its reduced CPU form (--device cpu): every check runs and passes, and the
JSON it writes holds one entry per check. On a CUDA GPU the same script runs the full-size checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, worker_env

pytestmark = pytest.mark.distributed  # check 3 launches DeepSpeed worlds of one process


def test_gpu_check_runs_every_check_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--json", str(out)], cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["device"] == "CPU (reduced checks)"
    checks = [r["check"] for r in report["results"]]
    assert checks == ["bnb 4-bit layer", "QLoRA SoRA run", "DeepSpeed zero2", "DeepSpeed zero3", "packing", "chunked loss", "step vs PEFT LoRA"]
    assert all(r["status"] == "pass" for r in report["results"]), report["results"]
    chunked = next(r for r in report["results"] if r["check"] == "chunked loss")
    assert chunked["peak_chunked"] < 0.5 * chunked["peak_logits"]


def test_gpu_check_refuses_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cuda"], cwd=REPO, env=worker_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "no CUDA GPU here" in proc.stderr
