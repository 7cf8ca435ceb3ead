"""Attention over the examples of a packed row one by one, where flash-attention's varlen kernel is
not available (CPU, or a GPU without flash-attn).

transformers runs a packed row (position ids restarting at each example, no 2-D mask) through
SDPA with a dense block-diagonal mask: every query attends over the whole row length, so a 1,024
token row of five examples costs the attention of 1,024 tokens, and SDPA cannot use its causal
fast path. This implementation instead runs SDPA with ``is_causal=True`` on each example's own
slice (found from the position ids), and on the unpadded part of each padded row: exactly
the same attention, for the cost of the examples. Where a query is not the whole key range
(generation with a cache) it falls back to SDPA with the equivalent 4-D mask.

Registered with transformers' attention and mask interfaces as ``"sora_varlen"``; turn it on with
:func:`use_varlen_attention`. flash-attention models are left as they are (their kernel already
works this way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "sora_varlen"


def segments(position_ids: torch.Tensor | None, lo: int, hi: int) -> list[tuple[int, int]]:
    """[start, end) of each example among the unpadded tokens ``lo:hi`` of one row: position ids
    restart at every example."""
    if hi <= lo:
        return []
    if position_ids is None:
        return [(lo, hi)]
    ids = position_ids[lo:hi]
    starts = [lo] + (torch.nonzero(ids[1:] <= ids[:-1]).flatten() + 1 + lo).tolist()
    return list(zip(starts, starts[1:] + [hi]))


def unpadded(attention_mask: torch.Tensor | None, row: int, length: int) -> tuple[int, int]:
    """[lo, hi) of the tokens of a row that are not padding (left or right)."""
    if attention_mask is None:
        return 0, length
    kept = torch.nonzero(attention_mask[row, -length:]).flatten()
    return (int(kept[0]), int(kept[-1]) + 1) if kept.numel() else (0, 0)


_LAST: list = [None, None]  # (position_ids, attention_mask, length), spans: one forward's every layer gets the same tensors


def row_spans(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, batch: int, length: int):
    """Per row: (lo, hi) of its unpadded tokens and its examples' [start, end). Every attention layer
    of one forward receives the same two tensors, so this is worked out (with its host syncs) once
    per forward, not once per layer."""
    key = _LAST[0]
    if key is not None and key[0] is position_ids and key[1] is attention_mask and key[2] == (batch, length):
        return _LAST[1]
    spans = []
    for b in range(batch):
        ids = None if position_ids is None else position_ids[min(b, position_ids.shape[0] - 1)]
        lo, hi = unpadded(attention_mask, b, length)
        spans.append((lo, hi, segments(ids, lo, hi)))
    _LAST[:] = [(position_ids, attention_mask, (batch, length)), spans]
    return spans


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """``query`` (B, H, Lq, D), ``key``/``value`` (B, Hkv, Lk, D); ``attention_mask`` None or the 2-D
    padding mask. Returns (B, Lq, H, D) as transformers' attention functions do."""
    batch, heads, q_len, dim = query.shape
    kv_len = key.shape[2]
    groups = heads // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    p = dropout if module.training else 0.0
    if q_len != kv_len:  # decoding with a cache: the ordinary masked SDPA
        mask = None
        if attention_mask is not None:
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
            mask = attention_mask[:, None, None, -kv_len:].bool() & causal
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=p, scale=scaling,
                                             is_causal=mask is None and q_len > 1)  # fmt: skip
        return out.transpose(1, 2).contiguous(), None
    rows = []
    for b, (lo, hi, spans) in enumerate(row_spans(kwargs.get("position_ids"), attention_mask, batch, kv_len)):
        pieces = [query.new_zeros(1, heads, lo, dim)]
        pieces += [F.scaled_dot_product_attention(query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e],
                                                  dropout_p=p, scale=scaling, is_causal=True)
                   for s, e in spans]  # fmt: skip
        pieces.append(query.new_zeros(1, heads, q_len - hi, dim))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs):
    """The mask this attention takes: the 2-D padding mask, or None when nothing is padded."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    return None if bool(attention_mask.all()) else attention_mask


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, padding_mask)


def use_varlen_attention(model) -> bool:
    """Switch an SDPA or eager transformers model to :func:`varlen_attention`; flash-attention models
    (already varlen) and other implementations are left alone. Returns whether it switched."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
