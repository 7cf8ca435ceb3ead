"""Files on disk: the adapter format (``io``: save_sora / load_sora), run folders (``layout``),
atomic writes (``atomic``), adapters found in run output (``sources``), ``sora-merge``
(``stream_merge``), ``sora-export`` to PEFT (``export``) and the 4-bit probe (``probe``)."""

from .io import load_sora, save_sora

__all__ = ["load_sora", "save_sora"]
