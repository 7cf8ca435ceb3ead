"""Periodic evaluation during training: loss and perplexity, generated-answer accuracy, or
classification metrics. The validation set is split across ranks and the results are summed over
them: each rank evaluates its share, and every rank runs the same number of forward passes (a rank
with fewer examples repeats one with weight 0), as ZeRO-3 and DDP's buffer broadcast need."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from ..backends import accelerate as engine
from ..data.formats import IGNORE
from .chunked_loss import DEFAULT_CHUNK_TOKENS, row_token_losses
from .loop import token_losses
from .metrics import classification_metrics, pearson


def shard_batches(examples: Sequence[dict], size: int, rank: int, world: int):
    """This rank's batches of its share ``examples[rank::world]``, each with a weight per example
    (0 for the padding that gives every rank the same number of batches)."""
    share = list(range(rank, len(examples), world))
    per_rank = -(-len(examples) // world)
    batches = -(-per_rank // size)
    for b in range(batches):
        indices = share[b * size : (b + 1) * size]
        weights = [1.0] * len(indices)
        if not indices:  # nothing left for this rank: one dummy example keeps the forwards in step
            indices, weights = [0], [0.0]
        yield [examples[i] for i in indices], weights


def _sum_over_ranks(accelerator, values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        tensor = accelerator.reduce(tensor, reduction="sum")
    return tensor.tolist()


@torch.no_grad()
def lm_loss(model: nn.Module, examples: Sequence[dict], collate_fn, batch_size: int, accelerator, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> dict:
    """Token-weighted mean loss over the labelled tokens of every rank's share, and its perplexity
    (chunked as in training: no full-vocabulary logits)."""
    total, tokens = 0.0, 0.0
    for chunk, weights in shard_batches(examples, batch_size, accelerator.process_index, accelerator.num_processes):
        batch = engine.to_device(collate_fn(chunk), accelerator)
        losses = row_token_losses(model, batch, chunk_tokens, token_losses)
        weight = torch.tensor(weights, device=losses.device)
        total += float((losses * weight).sum())
        tokens += float(((batch["labels"][:, 1:] != IGNORE).sum(-1) * weight).sum())
    total, tokens = _sum_over_ranks(accelerator, [total, tokens])
    mean = total / max(tokens, 1.0)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0))}


@torch.no_grad()
def generate_answers(model: nn.Module, examples: Sequence[dict], tokenizer, batch_size: int, max_new_tokens: int,
                     device, synced_gpus: bool = False) -> list[str]:  # fmt: skip
    """Greedy continuations of each example's prompt, left-padded: for chat rows the conversation up
    to its last assistant turn with the template's generation prompt, for instruction rows the
    prompt (both recorded when the row was tokenized, from the row's fields, not from its labels)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies = []
    for start in range(0, len(examples), batch_size):
        prompts = [list(e["input_ids"][: prompt_length(e)]) for e in examples[start : start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, synced_gpus=synced_gpus)  # fmt: skip
        replies += [tokenizer.decode(generated, skip_special_tokens=True) for generated in out[:, width:]]
    return replies


def reference_answer(example: dict, tokenizer) -> str:
    """The answer a reply is compared with: the labelled tokens after the prompt (the last turn)."""
    start = prompt_length(example)
    answer = [t for t, label in zip(example["input_ids"][start:], example["labels"][start:]) if label != IGNORE]
    return tokenizer.decode(answer, skip_special_tokens=True)


def is_correct(reply: str, example: dict, tokenizer) -> bool:
    """The reply starts with the reference answer, case-insensitively."""
    answer = normalize(reference_answer(example, tokenizer))
    return answer != "" and normalize(reply).startswith(answer)


def answer_accuracy(replies: Sequence[str], examples: Sequence[dict], tokenizer) -> float:
    """Share of replies that start with the reference answer."""
    return sum(is_correct(reply, example, tokenizer) for reply, example in zip(replies, examples)) / len(examples)


def generated_accuracy(model: nn.Module, examples: Sequence[dict], tokenizer, batch_size: int, max_new_tokens: int, accelerator) -> dict:
    """Generated-answer accuracy over every rank's share."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from ..backends.accelerate import uses_fsdp2

    # Sharded parameters are gathered by every rank's forward: all ranks run as many forwards as the longest.
    synced = (is_deepspeed_zero3_enabled() or uses_fsdp2(accelerator)) and accelerator.num_processes > 1
    bare = accelerator.unwrap_model(model)
    correct = counted = 0.0
    for chunk, weights in shard_batches(examples, batch_size, accelerator.process_index, accelerator.num_processes):
        replies = generate_answers(bare, chunk, tokenizer, len(chunk), max_new_tokens, accelerator.device, synced)
        correct += sum(w * is_correct(r, e, tokenizer) for r, e, w in zip(replies, chunk, weights))
        counted += sum(weights)
    correct, counted = _sum_over_ranks(accelerator, [correct, counted])
    return {"generated_accuracy": correct / max(counted, 1.0)}


def prompt_length(example: dict) -> int:
    """Tokens of the prompt: recorded for chat and instruction rows; otherwise those before the first label."""
    if "prompt_length" in example:
        return int(example["prompt_length"])
    return next(i for i, label in enumerate(example["labels"]) if label != IGNORE)


def normalize(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".!").split())


def _gather(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-d ``values`` concatenated (lengths may differ)."""
    if accelerator.num_processes == 1:
        return values
    size = torch.tensor([values.numel()], device=values.device)
    sizes = accelerator.gather(size).tolist()
    padded = torch.zeros(max(sizes), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    pieces = accelerator.gather(padded).view(len(sizes), -1)
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])


@torch.no_grad()
def classification(model: nn.Module, examples: Sequence[dict], collate_fn, batch_size: int, accelerator, num_labels: int) -> dict:
    """Accuracy, macro F1 and MCC (or Pearson for a 1-output regression head) over every rank's share."""
    predictions, labels = [], []
    for chunk, weights in shard_batches(examples, batch_size, accelerator.process_index, accelerator.num_processes):
        batch = engine.to_device(collate_fn(chunk), accelerator)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        keep = torch.tensor(weights, device=logits.device) > 0
        predictions.append((logits.squeeze(-1) if num_labels == 1 else logits.argmax(-1).float())[keep])
        labels.append(batch["labels"].float()[keep])
    predictions = _gather(accelerator, torch.cat(predictions)).cpu()
    labels = _gather(accelerator, torch.cat(labels)).cpu()
    if num_labels == 1:
        return {"pearson": pearson(predictions, labels), "mse": float(((predictions - labels) ** 2).mean())}
    return classification_metrics(predictions.long(), labels.long(), num_labels)


def make_evaluator(task: str, examples: Sequence[dict], collate_fn, batch_size: int, accelerator,
                   tokenizer=None, num_labels: int = 2, generate_tokens: int = 0,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Callable[[nn.Module], dict]:  # fmt: skip
    """The ``evaluate(model) -> metrics`` callback of :func:`sora_dist.training.loop.train`."""

    def evaluate(model: nn.Module) -> dict:
        was_training = model.training
        model.eval()
        try:
            if task == "sequence_classification":
                return classification(model, examples, collate_fn, batch_size, accelerator, num_labels)
            metrics = lm_loss(model, examples, collate_fn, batch_size, accelerator, chunk_tokens)
            if generate_tokens:
                metrics.update(generated_accuracy(model, examples, tokenizer, batch_size, generate_tokens, accelerator))
            return metrics
        finally:
            model.train(was_training)

    return evaluate
