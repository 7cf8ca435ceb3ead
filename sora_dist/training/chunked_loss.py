"""The causal-LM loss without full-vocabulary logits: the output layer and the cross-entropy, chunk by chunk.

The largest tensor of a fine-tuning step is batch x sequence x vocabulary logits (at 4 x 4,096
tokens and a 152k vocabulary, 10 GB in fp32). Here the output layer's forward is replaced, for the
duration of one model call, by :class:`LinearCrossEntropy`: from the final hidden states it takes
only the positions that have a label, and per chunk of ``chunk_tokens`` of them computes the logits
(fp32), their log-softmax, each token's loss, and at once the gradient of that loss with respect to
the hidden state ((softmax - one_hot) @ W, scaled by the softcap's derivative where the model caps
its logits). Only the per-row summed losses and that gradient (labelled tokens x hidden) are
kept, so peak memory is one chunk of logits, whatever the sequence, batch and vocabulary. The
model returns the per-row sums as its ``logits`` (shape (batch,)).

It runs inside the output layer's own forward, so DeepSpeed ZeRO-3 and FSDP2 have gathered its
weight there, and backward never needs the weight again. Our own code because transformers' loss
materialises the logits, and Liger's / Cut Cross-Entropy's fused kernels need a CUDA GPU.
Used where the output layer is a frozen dense ``nn.Linear`` (tied to the input embedding or not);
otherwise (a trained or quantized output layer) the plain loss runs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..data.formats import IGNORE

DEFAULT_CHUNK_TOKENS = None  # sized from the vocabulary: about CHUNK_LOGITS logits per chunk
CHUNK_LOGITS = 2**24  # 16M fp32 values, 64 MB per buffer: 341 tokens of a 49k vocabulary, 64 of a 262k one


def chunk_size(chunk_tokens: int | None, vocab: int) -> int:
    """Tokens per chunk: ``chunk_tokens`` when given, else about CHUNK_LOGITS logits' worth (32 to 8192)."""
    if chunk_tokens is not None:
        return chunk_tokens
    return max(32, min(8192, CHUNK_LOGITS // max(vocab, 1)))


class LinearCrossEntropy(torch.autograd.Function):
    """Per-row sums of next-token cross-entropy of ``hidden @ weight.T (+ bias)`` over labelled positions."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens: int, softcap: float | None):
        batch, length, width = hidden.shape
        targets = labels[:, 1:]
        rows, positions = (targets != IGNORE).nonzero(as_tuple=True)
        picked = hidden[:, :-1][rows, positions]  # (labelled tokens, hidden): a gather, not the logits
        wanted = targets[rows, positions]
        losses = torch.zeros(batch, dtype=torch.float32, device=hidden.device)
        need_grad = ctx.needs_input_grad[0]
        grad_picked = torch.empty_like(picked) if need_grad else None
        for start in range(0, picked.shape[0], chunk_tokens):
            h = picked[start : start + chunk_tokens]
            y = wanted[start : start + chunk_tokens]
            # Two (chunk x vocabulary) fp32 buffers at a time (three with a softcap): logits, log-probabilities.
            logits = F.linear(h, weight, bias).float()
            if softcap:
                capped = logits.div_(softcap).tanh_()  # tanh(z / cap), in place: the linear's output is ours
                logits = capped * softcap
            log_probs = torch.log_softmax(logits, dim=-1)
            del logits
            token_loss = -log_probs.gather(1, y[:, None]).squeeze(1)
            losses.index_add_(0, rows[start : start + chunk_tokens], token_loss)
            if need_grad:
                grad = log_probs.exp_()  # softmax, in place of the log-probabilities
                grad[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                if softcap:
                    grad.mul_(capped.square_().neg_().add_(1.0))  # d(cap * tanh(z / cap)) / dz = 1 - tanh²
                grad_picked[start : start + chunk_tokens] = (grad.to(weight.dtype) @ weight).to(picked.dtype)
            del log_probs
        ctx.save_for_backward(grad_picked, rows, positions)
        ctx.shape = (batch, length, width)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        grad_picked, rows, positions = ctx.saved_tensors
        if grad_picked is None:
            return None, None, None, None, None, None
        batch, length, width = ctx.shape
        grad_hidden = grad_picked.new_zeros(batch, length, width)
        grad_hidden[rows, positions] = grad_picked * grad_losses[rows, None].to(grad_picked.dtype)
        return grad_hidden, None, None, None, None, None


def output_layer(model: nn.Module) -> nn.Module | None:
    """The model's output layer when the chunked loss can stand in for it: a frozen dense Linear."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if type(head) is not nn.Linear or head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return None
    return head


def bare_model(model: nn.Module) -> nn.Module:
    """Through DDP's and DeepSpeed's wrappers (each holds the model as ``.module``); FSDP2 shards in place."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


@contextlib.contextmanager
def chunked_output(model: nn.Module, labels: torch.Tensor, chunk_tokens: int | None):
    """For one call of ``model``: its ``logits`` are the per-row summed token losses (shape (batch,)).
    Yields False (and changes nothing) when the model's output layer does not allow it."""
    bare = bare_model(model)
    head = output_layer(bare) if chunk_tokens != 0 else None
    if head is None:
        yield False
        return
    config = getattr(bare, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[1] != labels.shape[1]:
            raise RuntimeError(f"chunked loss: the output layer saw {hidden.shape[1]} positions, the labels have {labels.shape[1]}")
        return LinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, chunk_size(chunk_tokens, head.out_features), softcap)

    head.forward = forward
    if softcap is not None:
        config.final_logit_softcapping = None  # applied inside, to the logits, not to the losses
    try:
        yield True
    finally:
        del head.forward
        if softcap is not None:
            config.final_logit_softcapping = softcap


def row_token_losses(model: nn.Module, batch: dict, chunk_tokens: int | None, plain) -> torch.Tensor:
    """Per-row sums of the next-token cross-entropy over the labelled tokens of ``batch``: chunked
    where the model allows it, else ``plain(logits, labels)``."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with chunked_output(model, batch["labels"], chunk_tokens) as chunked:
        out = model(**inputs, use_cache=False)
    return out.logits if chunked else plain(out.logits, batch["labels"])
