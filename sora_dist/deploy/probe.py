"""How far a merged full-precision model is from the 4-bit model its adapter was trained on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .io import apply_adapter, auto_class

PROBES = (
    "The capital of France is",
    "Review: a tender, funny and beautifully acted film.\nIs this movie review positive or negative? Answer:",
    "def fibonacci(n):",
    "Water boils at a temperature of",
)


@dataclasses.dataclass
class ProbeReport:
    max_abs_logit_diff: float
    rel_logit_diff: float
    top1_agreement: float
    probes: int

    def summary(self) -> str:
        return (
            f"merged model vs the 4-bit model the adapter was trained on, {self.probes} probe prompts: "
            f"max |logit diff| = {self.max_abs_logit_diff:.3g}, relative = {self.rel_logit_diff:.3g}, "
            f"next-token agreement = {100 * self.top1_agreement:.1f}%. The difference is the 4-bit "
            "quantization error of the base weights, which the merged full-precision model no longer has."
        )


def _load(folder: Path, task: str | None, **kwargs):
    return auto_class(task).from_pretrained(folder, **kwargs).eval()


@torch.no_grad()
def probe_quantized_training(base: str | Path, meta: dict, tensors: dict, where: str, merged: str | Path) -> ProbeReport:
    """Compare logits of (4-bit base + adapter), as trained, with the merged model on a few prompts."""
    from transformers import AutoTokenizer, BitsAndBytesConfig

    base, merged = Path(base), Path(merged)
    tokenizer = AutoTokenizer.from_pretrained(base)
    quant = BitsAndBytesConfig.from_dict(dict(meta["base_quantization"]))
    device_map = None if torch.cuda.is_available() else "cpu"
    trained = _load(base, meta.get("task"), quantization_config=quant, device_map=device_map, dtype=quant.bnb_4bit_compute_dtype)
    apply_adapter(trained, meta, tensors, where)
    reference = _load(merged, meta.get("task"), dtype=torch.float32, device_map=device_map)
    diffs, norms, agree, count = [], [], 0, 0
    for prompt in PROBES:
        batch = tokenizer(prompt, return_tensors="pt").to(reference.device)
        a = trained(**batch).logits.float()
        b = reference(**batch).logits.float()
        diffs.append((a - b).abs().max())
        norms.append((a - b).norm() / b.norm())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        count += a.shape[1] if a.dim() == 3 else a.shape[0]
    return ProbeReport(float(max(diffs)), float(max(norms)), agree / count, len(PROBES))
